"""Patch features: both aggregations against independent re-implementations, shapes, determinism, no grad."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reb_dist.core.backbones import build_backbone
from reb_dist.core.feature_engines import TorchEngine
from reb_dist.core.features import PatchFeatures, aggregate_adaptive, aggregate_avgpool


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def image():
    """One 256 px image: stage 2 and 3 at 32x32 and 16x16."""
    return torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def small_images():
    """Two 128 px images (16x16 patch grid): cheap enough to run the backbone several times."""
    return torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))


def random_stages(b=2, c2=40, c3=112, h=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c2, h, h, generator=g), torch.randn(b, c3, h // 2, h // 2, generator=g)]


def neighbourhoods(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 9, H, W): each position's 3x3 neighbourhood (zero padded), row-major."""
    padded = F.pad(x, (1, 1, 1, 1))
    h, w = x.shape[-2:]
    return torch.stack([padded[..., i:i + h, j:j + w] for i in range(3) for j in range(3)], dim=2)


def adaptive_pool_1d(v: torch.Tensor, out: int) -> torch.Tensor:
    """(N, L) -> (N, out): bin i averages v[floor(i*L/out) : ceil((i+1)*L/out)]."""
    length = v.shape[1]
    return torch.stack([v[:, (i * length) // out: math.ceil((i + 1) * length / out)].mean(dim=1)
                        for i in range(out)], dim=1)


def bilinear(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


# --- avgpool (anomalib)


def test_avgpool_equals_manual_computation():
    stages = random_stages()
    got = aggregate_avgpool(stages)
    assert got.shape == (2, 152, 32, 32)
    # 3x3 mean with zero padding counted (count_include_pad, as nn.AvgPool2d(3, 1, 1)), per stage
    pooled = [neighbourhoods(s).sum(dim=2) / 9 for s in stages]
    expected = torch.cat([pooled[0], bilinear(pooled[1], (32, 32))], dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # channels in stage order: stage 2 first, untouched by the upsampling
    torch.testing.assert_close(got[:, :40], F.avg_pool2d(stages[0], 3, stride=1, padding=1))


def test_avgpool_features_of_lite0(lite0, image):
    feats = PatchFeatures(lite0.model, "avgpool")(image)
    assert feats.shape == (1, 152, 32, 32)
    with torch.no_grad():
        stages = lite0.model(image)
    torch.testing.assert_close(feats, aggregate_avgpool(stages))


# --- adaptive (PatchCore / REB authors)


@pytest.mark.parametrize("layer_dim,target_dim", [(64, 96), (1024, 1024), (200, 50)])
def test_adaptive_equals_manual_computation(layer_dim, target_dim):
    stages = random_stages(b=2, c2=12, c3=20, h=8, seed=1)
    got = aggregate_adaptive(stages, layer_dim, target_dim)
    assert got.shape == (2, target_dim, 8, 8)

    per_stage = []
    for s in stages:
        b, c = s.shape[:2]
        patches = neighbourhoods(s).reshape(b, c * 9, *s.shape[-2:])  # channel-major, as PatchCore
        patches = bilinear(patches, (8, 8)) if patches.shape[-1] != 8 else patches
        vectors = patches.permute(0, 2, 3, 1).reshape(-1, c * 9)
        per_stage.append(adaptive_pool_1d(vectors, layer_dim))
    expected = adaptive_pool_1d(torch.cat(per_stage, dim=1), target_dim)
    expected = expected.view(2, 8, 8, target_dim).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_adaptive_features_of_lite0(lite0, image):
    feats = PatchFeatures(lite0.model, "adaptive", layer_dim=256, target_dim=128)(image)
    assert feats.shape == (1, 128, 32, 32)
    assert torch.isfinite(feats).all()


@pytest.mark.parametrize("aggregation", ["avgpool", "adaptive"])
def test_constant_input_gives_constant_vectors_away_from_the_border(aggregation):
    """Zero padding only touches the border: one row/column of each stage's own grid, which the
    bilinear upsampling of stage 3 spreads to three on stage 2's grid. Everywhere else a constant
    feature map must aggregate to vectors holding that same constant."""
    stages = [torch.full((1, 40, 32, 32), 0.7), torch.full((1, 112, 16, 16), 0.7)]
    if aggregation == "avgpool":
        out = aggregate_avgpool(stages)
    else:
        out = aggregate_adaptive(stages, layer_dim=300, target_dim=128)
    interior = out[..., 3:-3, 3:-3]
    torch.testing.assert_close(interior, torch.full_like(interior, 0.7))
    # the zero padding lowers the border: the corner has 4 of its 9 neighbours inside the map
    assert out[0, 0, 0, 0] < 0.7


def test_spatially_constant_input_gives_the_same_vector_everywhere_inside():
    g = torch.Generator().manual_seed(3)
    c2, c3 = torch.randn(40, generator=g), torch.randn(112, generator=g)
    stages = [c2.view(1, -1, 1, 1).expand(1, 40, 32, 32).contiguous(),
              c3.view(1, -1, 1, 1).expand(1, 112, 16, 16).contiguous()]
    for out in (aggregate_avgpool(stages), aggregate_adaptive(stages, 128, 64)):
        interior = out[0, :, 3:-3, 3:-3].flatten(1)
        torch.testing.assert_close(interior, interior[:, :1].expand_as(interior))
    torch.testing.assert_close(aggregate_avgpool(stages)[0, :, 16, 16], torch.cat([c2, c3]))


def test_unknown_aggregation_is_rejected(lite0):
    with pytest.raises(ValueError, match="aggregation"):
        PatchFeatures(lite0.model, "maxpool")


# --- determinism, no grad


def test_features_are_deterministic_and_computed_without_grad(lite0, small_images):
    images = small_images
    model = PatchFeatures(lite0.model, "avgpool")
    grad_enabled = []
    hook = lite0.model.register_forward_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    try:
        engine = TorchEngine(model, torch.device("cpu"))  # what the detector extracts with on CPU
        first = [engine(b) for b in (images[:1], images[1:])]
        second = [engine(images)]
    finally:
        hook.remove()
    assert grad_enabled == [False, False, False]
    assert not any(p.requires_grad for p in model.parameters())
    assert [a.shape for a in first] == [(1, 16, 16, 152), (1, 16, 16, 152)]
    assert all(a.dtype == np.float32 for a in first + second)
    # the same images give the same features, whatever the batching
    np.testing.assert_allclose(np.concatenate(first), second[0], rtol=1e-5, atol=1e-5)
    third = [engine(images)]
    np.testing.assert_array_equal(second[0], third[0])
