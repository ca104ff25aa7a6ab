"""A fitted memory-bank detector: backbone + patch features + bank (+ densities), saved safely.

`Detector` glues the pure pieces together for one category: it extracts features, builds the bank
(optionally a coreset), scores patches with any method of `reb_dist.core.ldknn`, and turns patch scores
into image scores and pixel maps. The saved file is safetensors (tensors + JSON metadata, no
pickle); the backbone is referenced by name and weights fingerprint and checked when loaded.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from reb_dist import __version__
from reb_dist.core.anomaly_map import image_scores, pixel_maps
from reb_dist.core.backbones import Backbone, build_backbone
from reb_dist.config import BackboneConfig, BankConfig, ScoringConfig
from reb_dist.errors import ModelFileError
from reb_dist.core.features import PatchFeatures, extract_features
from reb_dist.core.ldknn import BankIndex, BankScorer, ScoringMethod, greedy_coreset, parse_method

MODEL_FORMAT = "reb-dist-model/1"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class Scores:
    """Scores of a set of images for one method."""

    method: ScoringMethod
    patch_maps: np.ndarray  # (N, h, w)
    image_scores: np.ndarray  # (N,)


@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, start: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class Detector:
    def __init__(self, backbone: Backbone, backbone_config: BackboneConfig, scoring: ScoringConfig,
                 image_size: int = 256, bank_config: BankConfig | None = None):
        self.backbone = backbone
        self.bank_config = bank_config or BankConfig()
        self.backbone_config = backbone_config
        self.scoring = scoring
        self.image_size = image_size
        self.device = resolve_device(backbone_config.device)
        self.features = PatchFeatures(backbone.model, backbone_config.aggregation,
                                      backbone_config.layer_dim, backbone_config.target_dim)
        self.features.to(self.device).eval()
        self.bank: np.ndarray | None = None
        self.scorer: BankScorer | None = None
        self.timings = Timings()

    @classmethod
    def from_config(cls, backbone: BackboneConfig, scoring: ScoringConfig, image_size: int = 256,
                    bank: BankConfig | None = None) -> Detector:
        return cls(build_backbone(backbone.name, backbone.weights), backbone, scoring, image_size, bank)

    # --- features

    def extract(self, batches: Iterable, total: int | None = None, desc: str = "features") -> np.ndarray:
        """(N, h, w, D) float32 features of batches of images (tensors or dicts with 'image')."""
        start = time.perf_counter()
        images = (b["image"] if isinstance(b, dict) else b
                  for b in tqdm(batches, total=total, desc=desc, unit="batch", leave=False))
        out = list(extract_features(self.features, images, self.device))
        self.timings.add("features", start)
        if not out:
            raise ValueError("no images to extract features from")
        return np.concatenate(out)

    # --- bank

    def fit_features(self, train_features: np.ndarray, shard_dir: str | Path | None = None) -> None:
        """Build the memory bank from (N, h, w, D) training features (coreset as the bank config says)."""
        b = self.bank_config
        bank = train_features.reshape(-1, train_features.shape[-1])
        if b.coreset_ratio < 1.0:
            start = time.perf_counter()
            bank = bank[greedy_coreset(bank, b.coreset_ratio, b.coreset_projection_dim, b.seed, progress=True)]
            self.timings.add("coreset", start)
        self.set_bank(bank, shard_dir=shard_dir)

    def set_bank(self, bank: np.ndarray, density: np.ndarray | None = None,
                 shard_dir: str | Path | None = None) -> None:
        """Index `bank` in process, or over `bank_config.shards` Ray actors (shard files in shard_dir)."""
        b = self.bank_config
        self.close()
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        if b.shards >= 1:
            from reb_dist.distributed.sharded_bank import ShardedBank

            if not (shard_dir or b.shard_dir):
                raise ValueError("a sharded bank needs a folder for its shard files (bank.shard_dir)")
            start = time.perf_counter()
            index = ShardedBank.create(self.bank, shard_dir or b.shard_dir, b.shards, dtype=b.dtype,
                                       neighbour_search=b.neighbour_search, nprobe=b.nprobe,
                                       cpus_per_shard=b.shard_cpus, gpus_per_shard=b.shard_gpus)
            self.timings.add("shards", start)
        else:
            index = BankIndex(self.bank, use_gpu=self.device.type == "cuda", dtype=b.dtype,
                              neighbour_search=b.neighbour_search, nprobe=b.nprobe)
        self.scorer = BankScorer(index)
        if density is not None:
            self.scorer.stats.preload_density(self.scoring.k, self.scoring.squared, density)

    def close(self) -> None:
        """Stop the shard actors of a sharded bank (nothing to do for an in-process one)."""
        if self.scorer is not None and hasattr(self.scorer.index, "close"):
            self.scorer.index.close()
        self.scorer = None

    @property
    def default_method(self) -> ScoringMethod:
        return parse_method(self.scoring.methods[0], self.scoring.k, self.scoring.alpha, self.scoring.squared)

    def methods(self, specs: list[str] | None = None) -> list[ScoringMethod]:
        s = self.scoring
        return [parse_method(m, s.k, s.alpha, s.squared) for m in (specs or s.methods)]

    def compute_density(self) -> np.ndarray:
        """Every bank point's density for the configured K (what `save` stores)."""
        start = time.perf_counter()
        density = self.scorer.stats.local_density(self.scoring.k, self.scoring.squared,
                                                  progress="bank density")
        self.timings.add("density", start)
        return density

    # --- scoring

    def score_features(self, features: np.ndarray, methods: list[ScoringMethod]) -> dict[ScoringMethod, Scores]:
        """Patch maps and image scores of (N, h, w, D) features for every method, from one search."""
        if self.scorer is None:
            raise RuntimeError("the detector has no memory bank: fit it or load a saved model first")
        n, h, w, d = features.shape
        if d != self.bank.shape[1]:
            raise ValueError(f"features have {d} dims, the bank {self.bank.shape[1]}")
        queries = features.reshape(-1, d)
        start = time.perf_counter()
        k_max = max(m.query_neighbours for m in methods)
        dist2, ids = self.scorer.index.search(queries, k_max, progress="bank search")
        self.timings.add("search", start)
        out = {}
        # LDKNN first: its bank densities and LOF's k-distances share one lazy self-search, so the
        # density cost is timed where the paper puts it, and LOF's time is only what it adds.
        for m in sorted(methods, key=lambda m: m.name != "ldknn"):
            start = time.perf_counter()
            maps = self.scorer.score_neighbours(m, dist2, ids, progress=True).reshape(n, h, w)
            self.timings.add(f"score:{m.label}", start)
            out[m] = Scores(m, maps, image_scores(maps, self.scoring.image_score))
        return {m: out[m] for m in methods}

    def pixel_maps(self, patch_maps: np.ndarray, size: int | tuple[int, int] | None = None) -> np.ndarray:
        return pixel_maps(patch_maps, size or self.image_size, self.scoring.sigma)

    # --- persistence

    def save(self, path: str | Path, density: np.ndarray | None = None) -> Path:
        """Write bank, densities and settings to a .safetensors file, atomically."""
        if self.bank is None:
            raise RuntimeError("nothing to save: the detector has no memory bank")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if density is None:
            density = self.compute_density()
        metadata = {
            "format": MODEL_FORMAT,
            "reb_dist_version": __version__,
            "backbone": json.dumps(self.backbone_config.__dict__),
            "backbone_weights": self.backbone.weights_source,
            "backbone_fingerprint": self.backbone.fingerprint,
            "scoring": json.dumps(self.scoring.__dict__),
            "image_size": str(self.image_size),
        }
        fd, tmp = tempfile.mkstemp(suffix=".tmp", prefix=path.name, dir=path.parent)
        os.close(fd)
        try:
            save_file({"bank": self.bank, "density": np.asarray(density, np.float32)}, tmp, metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, bank: BankConfig | None = None,
             shard_dir: str | Path | None = None) -> Detector:
        """A saved model; `bank` settings (storage, shards) say how to hold its bank this time."""
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"{path}: model file not found")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as exc:
            raise ModelFileError(f"{path}: not a reb-dist model file ({exc})") from exc
        if meta.get("format") != MODEL_FORMAT:
            raise ModelFileError(f"{path}: format {meta.get('format')!r}, expected {MODEL_FORMAT!r}")
        try:
            backbone_cfg = BackboneConfig(**json.loads(meta["backbone"]))
            scoring = ScoringConfig(**json.loads(meta["scoring"]))
            image_size = int(meta["image_size"])
            bank_vectors, density = tensors["bank"], tensors["density"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{path}: incomplete or incompatible model file ({exc!r})") from exc
        if device is not None:
            backbone_cfg.device = device
        detector = cls.from_config(backbone_cfg, scoring, image_size, bank)
        if detector.backbone.fingerprint != meta.get("backbone_fingerprint"):
            raise ModelFileError(
                f"{path}: was fitted with {backbone_cfg.name} weights of fingerprint "
                f"{meta.get('backbone_fingerprint')} ({meta.get('backbone_weights')}), but the weights "
                f"found now have fingerprint {detector.backbone.fingerprint} ({detector.backbone.weights_source})")
        try:
            detector.set_bank(bank_vectors, density, shard_dir=shard_dir)
        except ValueError as exc:
            raise ModelFileError(f"{path}: {exc}") from exc
        return detector
