"""The exported module scores every exportable method, coupled and decoupled, as the in-process
scorer does on the same bank and queries: the patch scores (one shared formula, torch vs numpy),
and the image scores and maps the module makes of them; TorchScript tracing keeps them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from reb_dist.core.anomaly_map import image_scores, pixel_maps
from reb_dist.core.ldknn import BankIndex, BankScorer, BankStats, ScoringMethod
from reb_dist.export.module import EXPORTABLE_METHODS, ExportedDetector

SIZE, D = 32, 6


class StubFeatures(nn.Module):
    """(B, 3, S, S) -> (B, D, S/8, S/8): 8x8 average pooling and a fixed random projection."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(D, 3, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("dc,bchw->bdhw", self.w, nn.functional.avg_pool2d(x, 8))


def _methods(squared: bool) -> list[ScoringMethod]:
    return [ScoringMethod("ldknn", 4, 0.7, squared), ScoringMethod("knn", 4, squared=squared),
            ScoringMethod("nn1", squared=squared), ScoringMethod("kthnn", 5, squared=squared)]


PAIRS = [(m, m) for m in _methods(True) + _methods(False)]  # coupled
PAIRS += [(a, b) for squared in (True, False) for a in _methods(squared) for b in _methods(squared)
          if a.name != b.name and "ldknn" in (a.name, b.name)]  # decoupled: ldknn with each other method
assert {m.name for pair in PAIRS for m in pair} == set(EXPORTABLE_METHODS)


@pytest.fixture(scope="module")
def setting():
    images = torch.randint(0, 256, (3, SIZE, SIZE, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    features = StubFeatures().eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        feats = features((images.float().permute(0, 3, 1, 2) / 255.0 - mean) / std).permute(0, 2, 3, 1).numpy()
    rng = np.random.default_rng(0)
    near = feats.reshape(-1, D)[rng.integers(0, feats.size // D, 200)]  # a bank around the features
    bank = (near + rng.normal(0, 0.3, (200, D))).astype(np.float32)
    return images, features, np.ascontiguousarray(feats), bank


def _densities(index, squared):
    stats = BankStats(index)
    return {k: stats.local_density(k, squared) for k in (4,)}


def _module(setting, image, map_method):
    _, features, _, bank = setting
    index = BankIndex(bank)
    return ExportedDetector(features, bank, image, map_method, _densities(index, image.squared), "pool3max", 1.0,
                            SIZE).eval()


@pytest.mark.parametrize("image,map_method", PAIRS, ids=[f"{a.label}|{b.label}|sq={a.squared}" for a, b in PAIRS])
def test_exported_scores_equal_the_bank_scorers(setting, image, map_method):
    images, _, feats, bank = setting
    n, h, w, _ = feats.shape
    module = _module(setting, image, map_method)
    queries = feats.reshape(-1, D)
    scorer = BankScorer(BankIndex(bank))
    # the patch scores: the same search's distances through the torch and the numpy formula
    with torch.no_grad():
        dist2, ids = module.search(torch.from_numpy(queries))
    for method in {image, map_method}:
        with torch.no_grad():
            exported = module.patch_scores(method, dist2, ids).numpy()
        core = scorer.score_neighbours(method, dist2.numpy(), ids.numpy().astype(np.int64), queries=queries)
        np.testing.assert_allclose(exported, core, rtol=1e-5, atol=1e-6 * np.abs(core).max())
    # end to end: the module's own search, image score and map against faiss + the core's post-processing
    want = scorer.score([image, map_method], queries)
    want_scores = image_scores(want[image].reshape(n, h, w), "pool3max")
    want_maps = pixel_maps(want[map_method].reshape(n, h, w), SIZE, 1.0)
    traced = torch.jit.trace(module, (images,), check_trace=False)
    for run in (module, traced):
        with torch.no_grad():
            scores, _, _, maps = run(images)
        np.testing.assert_allclose(scores.numpy(), want_scores, rtol=1e-5, atol=1e-6 * np.abs(want_scores).max())
        np.testing.assert_allclose(maps.numpy(), want_maps, rtol=0, atol=1e-5 * np.abs(want_maps).max())


def test_the_module_takes_only_exportable_methods_without_a_map(setting):
    knn = ScoringMethod("knn", 3)
    with pytest.raises(ValueError, match="not lof"):
        _module(setting, ScoringMethod("lof", 3), knn)
    with pytest.raises(ValueError, match=r"not ldknn\(k=4,alpha=0.7\)\+map:knn\(k=3\)"):
        _module(setting, ScoringMethod("ldknn", 4, 0.7, map=knn), knn)
