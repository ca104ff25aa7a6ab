"""A memory-bank detector: backbone + patch features + bank (+ densities) + scorers.

`Detector` glues the pure pieces together for one category: it extracts features, builds the bank
(optionally a coreset), indexes it with the index factory it was given (in process by default; the
pipelines inject a sharded bank on Ray actors), scores patches with any method of
`reb_dist.core.ldknn`, and turns patch scores into image scores and pixel maps. Saving and loading
are `reb_dist.io.model_file`'s job.

The core takes plain values: the scoring methods already parsed (`DetectorScoring`), the bank's
coreset and index options (`BankPlan`). `reb_dist.detectors` makes them from the settings object.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from reb_dist.progress import progress_bar

from reb_dist.core.anomaly_map import image_scores, pixel_maps
from reb_dist.core.backbones import Backbone
from reb_dist.core.feature_engines import (OnnxRuntimeEngine, TorchEngine, apply_threads, default_graph_folder,
                                           effective_precision, graph_key, onnxruntime_engine, resolve_engine)
from reb_dist.core.features import PatchFeatures
from reb_dist.core.ldknn.approx import RECALL_TARGET
from reb_dist.core.ldknn.formulas import NEIGHBOUR_METHODS
from reb_dist.core.ldknn.refine import REFINE_TOP, refine_methods
from reb_dist.core.ldknn.search import self_search_recall
from reb_dist.core.ldknn.approx import query_recall as measure_query_recall
from reb_dist.core.ldknn import BankIndex, BankScorer, Index, IndexFactory, ScoringMethod, select_coreset
from reb_dist.core.thresholds import Calibration

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """"auto" -> CUDA when torch sees a GPU, else CPU; any other name as torch spells it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class Scores:
    """Scores of a set of images for one method: its anomaly maps (from its map method when it has
    one) and its image scores (always from its own maps)."""

    method: ScoringMethod
    patch_maps: np.ndarray  # (N, h, w)
    image_scores: np.ndarray  # (N,)


@dataclass(frozen=True)
class NearestPatch:
    """The training patch nearest to an image's hottest patch: what the bank compared it with.

    Attributes:
        cell: the hottest patch's (row, column) on the image's (h, w) feature grid.
        train_index: the training image it came from (an index into `Detector.train_images`).
        train_cell: its (row, column) on that training image's feature grid.
        grid: the feature grid (h, w); a cell covers 1/h of the height and 1/w of the width.
        distance: the L2 distance between the two patch features.
        train_image: the training image's file, where the detector knows it.
    """

    cell: tuple[int, int]
    train_index: int
    train_cell: tuple[int, int]
    grid: tuple[int, int]
    distance: float
    train_image: str | None = None

    def box(self, cell: tuple[int, int], width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) pixels of a grid cell in an image of `width` x `height`."""
        (r, c), (h, w) = cell, self.grid
        return (int(c * width / w), int(r * height / h), int(round((c + 1) * width / w)),
                int(round((r + 1) * height / h)))


@dataclass
class Timings:
    """Seconds spent per stage (features, coreset, index, search, score:<method>, ...), summed."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, start: float) -> None:
        """Add the time since `start` (a perf_counter value) to stage `name`."""
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass(frozen=True)
class DetectorScoring:
    """What a detector scores with, as plain values (`reb_dist.detectors` parses the settings into it)."""

    # the first with its map method: what evaluate and predict score with and what a model's densities are for
    methods: tuple[ScoringMethod, ...]
    k: int = 9  # K of the bank densities a model file stores (scoring.k)
    squared: bool = True  # squared L2 (faiss's) or plain L2
    image_score: str = "max"  # how patch maps reduce to an image score (core.anomaly_map)
    sigma: float = 4.0  # the pixel maps' Gaussian blur
    pixel_metrics: bool = True  # whether the test set's pixel metrics are computed


@dataclass(frozen=True)
class BankPlan:
    """How a bank is reduced (coreset), stored and searched, and how an approximate search is checked."""

    coreset_ratio: float = 1.0  # 1.0: the whole bank
    coreset_method: str = "fast"
    coreset_projection_dim: int = 128
    seed: int = 0
    dtype: str = "float32"
    neighbour_search: str = "auto"
    nprobe: int = 0  # 0: calibrated per K to recall_target
    query_search: str = "auto"
    recall_sample: int = 2000
    recall_target: float = RECALL_TARGET
    refine_top: int = REFINE_TOP  # hottest patches per image scored again exactly (approximate searches)


def in_process_index(plan: BankPlan, use_gpu: bool = False) -> IndexFactory:
    """The default index factory: one index in this process, as `plan` says.

    On a GPU: faiss's GPU index when faiss was built with one (the `gpu` extra), else an exact
    torch search on the GPU (`TorchIndex`, no faiss needed). Otherwise a faiss `BankIndex`.
    """
    def build(bank: np.ndarray) -> Index:
        if use_gpu and not faiss_has_gpu():
            from reb_dist.core.ldknn.torch_search import TorchIndex

            return TorchIndex(bank, device="cuda", dtype=plan.dtype)
        return BankIndex(bank, use_gpu=use_gpu, dtype=plan.dtype, neighbour_search=plan.neighbour_search,
                         nprobe=plan.nprobe, query_search=plan.query_search, recall_target=plan.recall_target,
                         seed=plan.seed)

    return build


def faiss_has_gpu() -> bool:
    """Whether the installed faiss can search on a GPU (faiss-cpu cannot; the `gpu` extra can)."""
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class Detector:
    """One category's detector: extract features, fit a bank, score images.

    Args:
        backbone: the ImageNet CNN (with its 2nd and 3rd stage taps) features come from.
        scoring: the parsed methods, density K, image score and blur the detector scores with.
        image_size: the square size images are resized to.
        aggregation, layer_dim, target_dim: how the two stages' patch features are aggregated.
        device: where features are computed ("auto": CUDA when torch sees a GPU, else CPU).
        bank: coreset and index options of the bank.
        index_factory: builds the bank's `Index` (default: `in_process_index(bank)`).
        settings: the settings it was made from, as plain mappings ("backbone", "scoring"): stored
            with a saved model and reported; the detector itself never reads them.
        engine: what runs the forward pass: "auto", "torch" or "onnxruntime" (`core.feature_engines`).
        threads: CPU threads of torch, ONNX Runtime and faiss (0: the CPUs this process may use).
        graph_folder: where the ONNX engine caches its exported graph (default: beside the feature cache).
        precision: the forward pass's autocast dtype on a GPU ("fp32", "bf16", "fp16"); CPU runs float32.
    """

    def __init__(self, backbone: Backbone, scoring: DetectorScoring, image_size: int = 256, *,
                 aggregation: str = "avgpool", layer_dim: int = 1024, target_dim: int = 1024,
                 device: str = "auto", bank: BankPlan | None = None, index_factory: IndexFactory | None = None,
                 settings: dict | None = None, engine: str = "auto", threads: int = 0,
                 graph_folder: str | Path | None = None, precision: str = "fp32"):
        self.backbone = backbone
        self.plan = bank or BankPlan()
        self.scoring = scoring
        self.settings = settings or {}
        self.image_size = image_size
        self.aggregation, self.layer_dim, self.target_dim = aggregation, layer_dim, target_dim
        self.device = resolve_device(device)
        self.features = PatchFeatures(backbone.model, aggregation, layer_dim, target_dim)
        self.features.to(self.device).eval()
        self.threads = apply_threads(threads)
        self.engine_name = resolve_engine(engine, self.device)
        self.precision = effective_precision(precision, self.device)  # what the features are computed in
        if self.precision != precision:
            log.info(f"backbone.precision={precision} applies on a GPU; features on {self.device.type} run in float32")
        self.graph_folder = Path(graph_folder) if graph_folder else default_graph_folder()
        self._engine = None  # built on first use: a detector that only scores features never exports
        self.index_factory = index_factory or in_process_index(self.plan, self.device.type == "cuda")
        self.bank: np.ndarray | None = None
        self.scorer: BankScorer | None = None
        self.timings = Timings()
        # recall@K of the (approximate) test-patch search against exact, by K; empty when exact
        self.query_recall: dict[int, float] = {}
        self.refined_changed: dict[str, int] = {}  # method label -> refined patches whose score changed
        # recall@K of the (approximate) density search against exact, by K; empty when exact
        self.density_recall: dict[int, float] = {}
        # image threshold + score range from a validation split; saved in the model, used by predict
        self.calibration: Calibration | None = None
        # where each bank row came from: its index among the training patches (image-major, then the
        # (h, w) feature grid's rows), and the training images' files in that order; None when unknown
        self.bank_source: np.ndarray | None = None
        self.feature_grid: tuple[int, int] | None = None
        self.train_images: list[str] | None = None

    @property
    def index(self) -> Index | None:
        """The bank's index (None before a bank is set)."""
        return self.scorer.index if self.scorer is not None else None

    # --- features

    def extract(self, batches: Iterable, total: int | None = None, desc: str = "features") -> np.ndarray:
        """(N, h, w, D) float32 features of batches of images (tensors or dicts with 'image')."""
        start = time.perf_counter()
        images = (b["image"] if isinstance(b, dict) else b
                  for b in progress_bar(batches, total=total, desc=desc, unit="batch", leave=False))
        engine = self.feature_engine
        out = [engine(x) for x in images]
        self.timings.add("features", start)
        if not out:
            raise ValueError("no images to extract features from")
        return np.concatenate(out)

    @property
    def feature_engine(self) -> TorchEngine | OnnxRuntimeEngine:
        """The engine that runs the forward pass (`engine_name`), built on first use."""
        if self._engine is None:
            start = time.perf_counter()
            if self.engine_name == "onnxruntime":
                key = graph_key(self.backbone.name, self.backbone.fingerprint, self.aggregation, self.layer_dim,
                                self.target_dim, self.image_size)
                try:
                    self._engine = onnxruntime_engine(self.features, self.backbone.channels, key, self.image_size,
                                                      self.graph_folder, self.threads)
                except OSError as exc:  # e.g. a read-only cache folder: torch computes the same features
                    log.warning("the ONNX feature graph cannot be written to %s (%s); features run on torch",
                                self.graph_folder, exc.strerror or exc)
                    self.engine_name = "torch"
                    self._engine = TorchEngine(self.features, self.device)
            else:
                self._engine = TorchEngine(self.features, self.device, precision=self.precision)
            self.timings.add("engine", start)
        return self._engine

    # --- bank

    def fit_features(self, train_features: np.ndarray) -> None:
        """Build the memory bank from (N, h, w, D) training features (coreset as the bank config says)."""
        b = self.plan
        bank = train_features.reshape(-1, train_features.shape[-1])
        source = np.arange(len(bank), dtype=np.int64)
        if b.coreset_ratio < 1.0:
            start = time.perf_counter()
            source = select_coreset(bank, b.coreset_ratio, b.coreset_method, b.coreset_projection_dim, b.seed,
                                    progress=True).astype(np.int64)
            bank = bank[source]
            self.timings.add("coreset", start)
        self.set_bank(bank, source=source, grid=train_features.shape[1:3])

    def set_bank(self, bank: np.ndarray, density: np.ndarray | None = None,
                 map_density: np.ndarray | None = None, source: np.ndarray | None = None,
                 grid: tuple[int, int] | None = None) -> None:
        """Index `bank` (n, D) with the index factory; `density` (n,) preloads known densities for the
        configured K, `map_density` those for the map's K (`map_density_k`); `source` (n,) and `grid`
        say where each row came from (see `nearest_training_patches`; None: unknown)."""
        if source is not None and (len(source) != len(bank) or grid is None):
            raise ValueError(f"bank source: {len(source)} entries for {len(bank)} bank rows (and grid {grid})")
        self.close()
        self.bank_source = None if source is None else np.asarray(source, dtype=np.int64)
        self.feature_grid = None if source is None else (int(grid[0]), int(grid[1]))
        self.query_recall, self.density_recall, self.refined_changed = {}, {}, {}
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        start = time.perf_counter()
        self.scorer = BankScorer(self.index_factory(self.bank))
        self.timings.add("index", start)
        if density is not None:
            self.scorer.stats.preload_density(self.scoring.k, self.scoring.squared, density)
        if map_density is not None and self.map_density_k is not None:
            self.scorer.stats.preload_density(self.map_density_k, self.scoring.squared, map_density)

    def close(self) -> None:
        """Release the bank's index (stops a sharded bank's actors; nothing to do in process)."""
        if self.scorer is not None:
            self.scorer.index.close()
        self.scorer = None

    @property
    def search_mode(self) -> str:
        """What the bank's searches compute, the label every result row carries:

        "exact": the whole bank, searched exactly (the paper's protocol);
        "faithful": the whole bank, candidates found approximately and re-ranked exactly, so nearest
            points and densities are the exact ones wherever the search found them (recall measured);
        "coreset-densities": a coreset bank, whose densities are taken among coreset points (another
            quantity than the whole bank's, not an approximation of it);
        "auto": not fitted yet, and "auto" searches, which are exact or faithful by the bank's size.
        """
        if self.plan.coreset_ratio < 1.0:
            return "coreset-densities"
        index = self.index
        if index is None:  # "auto" resolves by the bank's size, unknown until it is fitted
            kinds = {self.plan.query_search, self.plan.neighbour_search}
            return "exact" if kinds == {"exact"} else "auto" if "auto" in kinds else "faithful"
        kinds = {getattr(index, "query_search", "exact"), getattr(index, "neighbour_search", "exact")}
        return "exact" if kinds == {"exact"} else "faithful"

    def measure_density_recall(self, k: int) -> None:
        """Measure (once per K) the density search's recall@K against exact, when it is approximate."""
        index = self.index
        if getattr(index, "neighbour_search", "exact") == "exact" or k in self.density_recall:
            return
        start = time.perf_counter()
        self.density_recall[k] = self_search_recall(index, min(k, len(index) - 1), self.plan.recall_sample,
                                                    self.plan.seed)
        self.timings.add("recall", start)

    @property
    def default_method(self) -> ScoringMethod:
        """The first method, with its map method when it has one: what `evaluate` and `predict`
        score with and what a saved model's densities are for."""
        return self.scoring.methods[0]

    def methods(self) -> list[ScoringMethod]:
        """Every method the detector was made with, the default first."""
        return list(self.scoring.methods)

    @property
    def map_density_k(self) -> int | None:
        """K of the bank densities the default method's map needs beside the image score's (None:
        no other K: the map is coupled, not LDKNN, or LDKNN at the image score's K)."""
        m = self.default_method.map
        return m.k if m is not None and m.name == "ldknn" and m.k != self.scoring.k else None

    def compute_density(self, k: int | None = None) -> np.ndarray:
        """Every bank point's density for K = `k` (default: the configured K; what a model file stores)."""
        start = time.perf_counter()
        density = self.scorer.stats.local_density(k or self.scoring.k, self.scoring.squared,
                                                  progress="bank density")
        self.timings.add("density", start)
        self.measure_density_recall(k or self.scoring.k)
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
        if any(m.needs_search for m in methods):
            start = time.perf_counter()
            k_max = max(m.query_neighbours for m in methods)
            dist2, ids = self.scorer.index.search(queries, k_max, progress="bank search")
            self.timings.add("search", start)
            if self.scorer.index.query_search != "exact" and k_max not in self.query_recall:
                start = time.perf_counter()  # an approximate figure is never mistaken for an exact one
                self.query_recall[k_max] = measure_query_recall(self.scorer.index, queries, k_max,
                                                        self.plan.recall_sample, self.plan.seed)
                self.timings.add("recall", start)
        else:  # gde alone reads no neighbours: no search, and no recall to measure
            dist2, ids = np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        maps: dict[ScoringMethod, np.ndarray] = {}  # by coupled method: a decoupled pair reuses its parts
        # LDKNN first: its bank densities and LOF's k-distances share one lazy self-search, so the
        # density cost is timed where the paper puts it, and LOF's time is only what it adds.
        parts = {part for m in methods for part in (m.image, m.map_method)}
        density_ks = sorted({part.k for part in parts if part.name == "ldknn"})
        if len(density_ks) > 1:  # one self-search with the largest K gives every smaller K's densities
            start = time.perf_counter()
            self.scorer.stats.neighbours(density_ks[-1], np.unique(ids[:, 0]), progress="bank density")
            self.timings.add("density", start)
        for part in sorted(parts, key=lambda m: (m.name != "ldknn", m.label)):
            start = time.perf_counter()
            maps[part] = self.scorer.score_neighbours(part, dist2, ids, progress=True,
                                                      queries=queries).reshape(n, h, w)
            self.timings.add(f"score:{part.label}", start)
        if density_ks:
            self.measure_density_recall(density_ks[-1])
        refine = sorted({m.image for m in methods} & set(self._refined_parts(parts)), key=lambda m: m.label)
        if refine:  # one set of exact searches for every method's hottest patches
            start = time.perf_counter()
            refined = refine_methods(self.scorer.index, refine, features.reshape(n, h * w, d),
                                     [maps[part].reshape(n, h * w) for part in refine], self.plan.refine_top)
            for part, (scores, self.refined_changed[part.label]) in zip(refine, refined):
                maps[part] = scores.reshape(n, h, w)
            self.timings.add("refine", start)
        # the image score from the image method's maps; the map (and pixel metrics) from the map method's
        return {m: Scores(m, maps[m.map_method], image_scores(maps[m.image], self.scoring.image_score))
                for m in methods}

    @property
    def refines_image_scores(self) -> bool:
        """Whether LDKNN image scores are refined (`reb_dist.core.ldknn.refine`): a fitted bank with an
        approximate search, bank.refine_top > 0 and image scores reduced by "max"."""
        return bool(self._refined_parts([ScoringMethod("ldknn")]))

    def _refined_parts(self, parts) -> list[ScoringMethod]:
        """The parts whose image scores are refined: neighbour methods whose search or (LDKNN) density
        search is approximate, when bank.refine_top > 0 and image scores are reduced by "max"."""
        index = self.index
        if index is None or self.plan.refine_top <= 0 or self.scoring.image_score != "max":
            return []
        queries = getattr(index, "query_search", "exact") != "exact"
        densities = getattr(index, "neighbour_search", "exact") != "exact"
        return [p for p in parts if p.name in NEIGHBOUR_METHODS and (queries or densities and p.name == "ldknn")]

    def nearest_training_patches(self, features: np.ndarray, patch_maps: np.ndarray) -> list[NearestPatch | None]:
        """For each image, the training patch nearest to its hottest patch (the argmax of its (h, w)
        patch map): one exact 1-NN search of N queries. All None when the bank's provenance is
        unknown (models saved before it was recorded, banks set by hand)."""
        n, h, w, d = features.shape
        if self.bank_source is None or self.scorer is None or self.feature_grid != (h, w):
            return [None] * n
        hot = patch_maps.reshape(n, -1).argmax(1)
        dist2, ids = self.scorer.index.search(np.ascontiguousarray(features.reshape(n, h * w, d)[np.arange(n), hot]),
                                              1, exact=True)
        source = self.bank_source[ids[:, 0]]
        image, cell = np.divmod(source, h * w)
        names = self.train_images or []
        return [NearestPatch(cell=divmod(int(q), w), train_index=int(i), train_cell=divmod(int(c), w), grid=(h, w),
                             distance=float(np.sqrt(max(float(d2), 0.0))),
                             train_image=names[int(i)] if int(i) < len(names) else None)
                for q, i, c, d2 in zip(hot, image, cell, dist2[:, 0])]

    def pixel_maps(self, patch_maps: np.ndarray, size: int | tuple[int, int] | None = None) -> np.ndarray:
        """(N, h, w) patch maps -> (N, H, W) blurred pixel maps at `size` (default: the image size)."""
        return pixel_maps(patch_maps, size or self.image_size, self.scoring.sigma)
