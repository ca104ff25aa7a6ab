"""One settings object per run: defaults <- a YAML/JSON file <- `section.key=value` overrides.

The flattened settings are logged with every MLflow run, so a result always says how it was made.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from reb_dist.errors import ConfigError
from reb_dist.names import LAYOUTS, VALIDATION_KINDS

SAMPLE_DATA = Path(__file__).parent / "sample_data" / "mvtec_ad_256"
#: Example settings and sweep files shipped in the package (the repository's jobs/ and tune/ link to
#: them), usable by name wherever a config file is asked for: `reb tune --config k_alpha`.
PACKAGED_CONFIGS = Path(__file__).parent / "configs"


def packaged_configs() -> dict[str, Path]:
    """The packaged config files by name (file name without .yaml)."""
    return {p.stem: p for p in sorted(PACKAGED_CONFIGS.glob("*.yaml"))}


def config_file(path: str | Path, what: str = "config file") -> Path:
    """`path` when it is a file, else the packaged config of that name (a bare name, with or without
    .yaml), so an installed package's examples need no repository checkout.

    Raises:
        ConfigError: neither exists; the message lists the packaged names.
    """
    path = Path(path)
    if path.is_file():
        return path
    packaged = packaged_configs()
    if path.parent == Path(".") and path.stem in packaged and path.suffix in ("", ".yaml"):
        return packaged[path.stem]
    raise ConfigError(f"{path}: {what} not found (packaged ones, usable by name: {', '.join(packaged)})")


@dataclass
class DataConfig:
    """Where the images are and how they are read (section `data`)."""

    layout: str = "mvtec"  # mvtec | loco | btad | mvtec3d | folder
    root: str = "sample"  # "sample": the MVTec AD bottle and pill subsets shipped with the package
    categories: list[str] = field(default_factory=list)  # empty: every category under root
    image_size: int = 256
    batch_size: int = 16
    num_workers: int = 0
    few_shot: int = 0  # > 0: only the first N training images (sorted), as REB Table 7
    check_files: bool = True  # open every image and mask before any long computation
    # layout "folder" only: folders relative to root (masks optional, matched by file stem)
    train_dir: str = "train"
    test_normal_dir: str = "test/normal"
    test_anomalous_dir: str = "test/anomalous"
    mask_dir: str | None = None

    def resolved_root(self) -> Path:
        """The dataset root as a Path ("sample" is the bundled bottle and pill subsets)."""
        return SAMPLE_DATA if self.root == "sample" else Path(self.root).expanduser()


@dataclass
class BackboneConfig:
    """Which CNN and weights features come from, and how they are aggregated (section `backbone`)."""

    name: str = "efficientnet_lite0"
    weights: str | None = None  # None: ImageNet; else a weights file (e.g. DefectMaker fine-tuned)
    # benchmark only: also score with these fine-tuned weights ("{category}" is filled in), so
    # REB (= fine-tuned + LDKNN) and DefectMaker (= fine-tuned + KNN) sit next to LDKNN and KNN
    finetuned: str | None = None
    aggregation: str = "avgpool"  # avgpool (anomalib) | adaptive (PatchCore / REB authors)
    layer_dim: int = 1024  # adaptive only
    target_dim: int = 1024  # adaptive only
    device: str = "auto"  # auto | cpu | cuda
    # what runs the forward pass: auto (onnxruntime on CPU when installed, else torch) | torch | onnxruntime
    engine: str = "auto"
    threads: int = 0  # CPU threads of torch, ONNX Runtime and faiss; 0: this process's CPUs (a Ray worker's share)
    # the forward pass's autocast dtype on a GPU: fp32 | bf16 | fp16 (features stay float32); CPU runs float32
    precision: str = "fp32"


@dataclass
class BankConfig:
    """How the memory bank is reduced, stored, searched and placed (section `bank`)."""

    coreset_ratio: float = 1.0  # 1.0 keeps the whole bank (REB's default)
    coreset_projection_dim: int = 128
    coreset_method: str = "fast"  # fast (batched exact greedy) | greedy (PatchCore's serial loop) | random
    seed: int = 0
    dtype: str = "float32"  # float32 | float16 (half the memory; vectors rounded to half precision)
    # how bank densities find each bank point's K neighbours over the WHOLE bank: exact | ivf | hnsw |
    # auto (exact up to 100k points, IVF above; see reb_dist/core/ldknn/approx.py)
    neighbour_search: str = "auto"
    # IVF lists visited per query; 0: the fewest that reach recall_target on a seeded sample, per K
    nprobe: int = 0
    recall_target: float = 0.99  # recall@K against exact a calibrated nprobe must reach (seeded bank points)
    # how test patches find their nearest bank points: exact | ivf | hnsw | auto (as neighbour_search);
    # approximate candidates are re-ranked exactly, and every run reports its recall against exact
    query_search: str = "auto"
    recall_sample: int = 2000  # queries (seeded) whose approximate neighbours are checked against exact
    # where a search is approximate: each image's N hottest patches are scored again with exact
    # searches, so image scores (a max) are the exact path's wherever the true max is among them; 0: off
    refine_top: int = 8
    shards: int = 0  # 0: one in-process faiss index; N >= 1: N Ray actors, one shard each
    shard_cpus: float = 1.0
    shard_gpus: float = 0.0
    shard_dir: str = ""  # where shard files live; empty: <output_dir>/bank_shards/<category>


@dataclass
class ScoringConfig:
    """Scoring methods and their K/alpha, image score, map blur, pixel metrics (section `scoring`)."""

    methods: list[str] = field(default_factory=lambda: ["ldknn", "knn", "nn1"])
    k: int = 9  # the authors' MVTec AD default
    alpha: float = 1.0
    # the anomaly map's own method for the first method (what fit, evaluate, predict and saved models
    # use), e.g. "knn" or "ldknn:k=9,alpha=0.1"; empty: the map is the image score's own (the paper's
    # coupled setting). Both come from one neighbour search.
    map_method: str = ""
    squared: bool = True  # squared L2, as the authors' code; False: plain L2 as the paper writes
    image_score: str = "max"  # max | pool3max
    sigma: float = 4.0
    pixel_metrics: bool = True

    def named_specs(self) -> list[tuple[str, str]]:
        """Every method spec in use (each methods entry, then map_method if set), with the setting it
        comes from, for messages."""
        specs = [(f"scoring.methods entry {spec!r}", spec) for spec in self.methods]
        if self.map_method.strip():
            specs.append((f"scoring.map_method={self.map_method!r}", self.map_method))
        return specs


@dataclass
class FinetuneConfig:
    """REB's self-supervised fine-tuning (paper 3.1; METHOD-NOTES). Defaults are the paper's GPU
    schedule; scale `steps` / `images_per_step` down for CPUs (see docs/RESULTS.md)."""

    task: str = "defectmaker"  # defectmaker (7 classes) | cutpaste | noise
    steps: int = 300
    images_per_step: int = 1008  # 48 base images x 7 variants x 3 accumulated batches
    micro_batch: int = 56  # images per forward pass on one worker (a multiple of the class count)
    freeze_steps: int = 40
    bn_stats: str = "update"  # update (the authors: re-estimated on the SSL images) | frozen (keep ImageNet's)
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 3e-5
    loss: str = "bce"  # bce (the authors' code) | ce (the paper)
    blend_prob: float = 0.5
    saliency: str = "spectral"  # spectral | whole | a folder of precomputed saliency maps
    checkpoint_every: int = 20
    # keep every checkpoint and, after training, score the test set with each one's backbone (and the
    # start weights): the learning curve, in MLflow and <output_dir>/finetune/<category>/learning_curve.*
    evaluate_checkpoints: bool = False
    # ray: Ray Data stream -> Ray Train workers (a cluster or a local Ray); local: the same loop and rows
    # as one Ray Train worker, in this process, without Ray (a lone GPU machine; the same seed gives the
    # same weights as num_workers=1 on Ray)
    engine: str = "ray"
    max_failures: int = 2  # worker deaths (OOM kill, lost node) a run survives, each resumed from the newest checkpoint
    num_workers: int = 2  # Ray Train workers; GPUs when the cluster has them
    use_gpu: str = "auto"  # auto | true | false
    cpus_per_worker: float = 1.0
    data_workers: int = 2  # DefectMaker actors in the Ray Data pipeline
    data_cpus: float = 0.5  # fractional: a pool that takes every CPU starves the read tasks
    torch_threads: int = 1
    seed: int = 0
    storage_path: str = "outputs/ray"
    run_name: str | None = None
    fail_at_step: int | None = None  # testing: interrupt the run after this step


@dataclass
class TrackingConfig:
    """MLflow: on/off, store URI, experiment, run name, heatmap examples, model registry (section `tracking`)."""

    enabled: bool = True
    # None: MLFLOW_TRACKING_URI if set, else sqlite:///mlflow.db (MLflow's precedence; reb_dist.io.tracking)
    uri: str | None = None
    experiment: str = "reb-dist"
    run_name: str | None = None
    heatmap_examples: int = 8
    # `reb fit` registers each model it logs under this name ("{category}" is filled in); "": not registered
    register_model: str = ""


@dataclass
class CacheConfig:
    """Cache of patch features per image, so runs on the same images skip the backbone (section `cache`)."""

    enabled: bool = True
    dir: str = ""  # empty: $XDG_CACHE_HOME/reb-dist/features (~/.cache/reb-dist/features)
    max_gb: float = 20.0  # least recently used files are evicted above this size


@dataclass
class TuneConfig:
    """Per-class K and alpha search on a validation split (Ray Tune + Optuna)."""

    validation: str = "synthetic"  # synthetic (held-out normals + DefectMaker) | test (a seeded part of test)
    fraction: float = 0.0  # 0: 0.1 of the training images (synthetic) / 0.3 of the test set (test)
    k_min: int = 1
    k_max: int = 64
    alpha_min: float = 0.0
    alpha_max: float = 2.0
    trials: int = 40
    # the anomaly map's search (method ldknn or knn, its K in k_min..k_max and alpha in alpha_min..
    # map_alpha_max), on validation pixel AUROC and AUPRO; trials per class, 0: no map search (coupled)
    map_trials: int = 40
    map_alpha_max: float = 1.0
    multi_objective: bool = False  # also a coupled (K, alpha) from the Pareto front of image AUROC and map objective
    # auto | f1 | quantile: how the image threshold is taken from validation scores (auto: the normals'
    # quantile when the validation anomalies are all easier than every normal and there are at least
    # 1 / (1 - quantile) normals, else best F1)
    threshold: str = "auto"
    quantile: float = 0.99  # of the validation normals' scores, for threshold "quantile"
    concurrency: int = 0  # trials at once; 0: as many as the cluster has CPUs
    seed: int = 0
    storage_path: str = "outputs/ray"


@dataclass
class RunConfig:
    """One run's settings: every section, loadable from YAML/JSON, overridable with `section.key=value`."""

    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    output_dir: str = "outputs"
    # a named set of defaults (PRESETS) under the file and the overrides: auto (the default), exact,
    # faithful or coreset-densities ("fast" is read as coreset-densities)
    preset: str = "auto"

    @classmethod
    def from_dict(cls, values: dict, source: str = "settings") -> RunConfig:
        """Settings from a nested mapping, every key and type checked (errors name `source`).

        A `preset` in the mapping supplies defaults for what the mapping does not set itself.
        """
        values = values or {}
        preset = values.get("preset", "auto") if isinstance(values, dict) else "auto"
        if preset in PRESET_ALIASES:  # an older name: read as what it always computed
            preset = PRESET_ALIASES[preset]
            values = {**values, "preset": preset}
        if preset not in PRESETS:
            raise ConfigError(f"{source}: preset {preset!r} is unknown; known: {sorted(PRESETS)}")
        cfg = _build(cls, _merge(PRESETS[preset], values), source)
        cfg.validate(source)
        return cfg

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | tuple = ()) -> RunConfig:
        """Defaults <- the YAML/JSON file at `path` (if any) <- `section.key=value` overrides."""
        values: dict = {}
        if path is not None:
            path = config_file(path)
            try:
                values = yaml.safe_load(path.read_text()) or {}  # YAML is a superset of JSON
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML/JSON ({exc})") from exc
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: must hold a mapping of sections, not {type(values).__name__}")
        for item in overrides:
            apply_override(values, item)
        return cls.from_dict(values, str(path) if path else "settings")

    def validate(self, source: str = "settings") -> None:
        """Check every setting with a fixed set of values or a range, before any data is read.

        Choice lists come from the code that reads each setting (see `_choices`), method specs are
        parsed by the scorers' own `parse_method`, numbers are checked against `RANGES` (floats must
        also be finite), and a few pairs against each other (tune.k_min <= tune.k_max, ...).
        What depends on the data (few_shot against a class's images, K against its bank) is checked
        where the data is loaded (`reb_dist.pipelines.evaluate`).

        Raises:
            ConfigError: naming `source` and, for each bad setting, its key, its value and what is allowed.
        """
        problems = []
        values = self._values()
        choices = _choices()
        for key, value in values.items():
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{key}={value!r} is not a number; allowed: a finite number")
            elif key in RANGES and value is not None and not _in_interval(value, RANGES[key]):
                problems.append(f"{key}={value!r} is out of range; allowed: {_describe(RANGES[key])}")
            elif key in choices and value not in choices[key]:
                problems.append(f"{key}={value!r} is unknown; allowed: {', '.join(map(str, choices[key]))}")
        problems += _device_problems(self.backbone.device)
        problems += _method_problems(self.scoring)
        for low, high in (("tune.k_min", "tune.k_max"), ("tune.alpha_min", "tune.alpha_max")):
            if values[low] > values[high]:  # nan compares False and is reported above
                problems.append(f"{low}={values[low]!r} is more than {high}={values[high]!r}; "
                                f"allowed: {low} <= {high}")
        if problems:  # every bad setting at once, on one line
            raise ConfigError(f"{source}: " + "; ".join(problems))

    def _values(self) -> dict[str, object]:
        """section.key -> value, the values themselves (`flat` gives them as text)."""
        out: dict[str, object] = {}
        for section, values in self.to_dict().items():
            if isinstance(values, dict):
                out.update({f"{section}.{k}": v for k, v in values.items()})
            else:
                out[section] = values
        return out

    def to_dict(self) -> dict:
        """The settings as a nested dict of plain values."""
        return asdict(self)

    def flat(self) -> dict[str, str]:
        """section.key -> value as text: the form MLflow params take."""
        return {k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in self._values().items()}

    def to_yaml(self) -> str:
        """The settings as YAML text, loadable with `RunConfig.load` (callers write it atomically)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Named defaults, applied under a run's file and overrides (`--preset faithful`). Every result row
# says which mode computed it (Detector.search_mode) and the recall it measured; docs/RESULTS.md
# section 11 has the figures.
# - auto (the default): exact up to 100k bank points (approx.EXACT_UP_TO), faithful above.
# - exact: the whole bank, searched exactly: the paper's protocol; O(n^2) densities at worst, the search
#   skipping the k-means lists that bounds rule out (ldknn.pruned: pill 8.5x quicker, magnetic_tile 2.2x).
# - faithful: the whole bank; test patches and densities searched with IVF, re-ranked exactly, nprobe
#   calibrated to bank.recall_target: the exact quantities, approximately, at a fraction of the cost.
# - coreset-densities: a 10% coreset bank, densities AMONG CORESET POINTS (another quantity, not an
#   approximation of the whole bank's: it can rank methods and choose K/alpha differently); for small
#   models and fast predict.
PRESETS: dict[str, dict] = {
    "auto": {},
    "exact": {"bank": {"coreset_ratio": 1.0, "query_search": "exact", "neighbour_search": "exact"}},
    "faithful": {"bank": {"coreset_ratio": 1.0, "query_search": "ivf", "neighbour_search": "ivf", "nprobe": 0}},
    "coreset-densities": {"bank": {"coreset_ratio": 0.1, "coreset_method": "fast", "query_search": "ivf",
                                   "neighbour_search": "ivf", "nprobe": 0}},
}
# older preset names, read as the preset that computes what they computed
PRESET_ALIASES = {"fast": "coreset-densities"}


# section.key -> the interval its value must lie in: "[" and "]" include the bound, "(" and ")" do not.
# Optional settings left at None are not checked; every float setting must also be finite.
MAX_ALPHA = 100  # the largest LDKNN alpha any setting takes (scoring, method specs, tune's search space)
RANGES: dict[str, str] = {
    "data.image_size": "[1, inf)",
    "data.batch_size": "[1, inf)",
    "data.num_workers": "[0, inf)",
    "data.few_shot": "[0, inf)",  # 0: every training image
    "backbone.layer_dim": "[1, inf)",
    "backbone.target_dim": "[1, inf)",
    "backbone.threads": "[0, inf)",  # 0: the CPUs this process may use
    "bank.coreset_ratio": "(0, 1]",
    "bank.coreset_projection_dim": "[0, inf)",  # 0: no projection
    "bank.seed": "[0, inf)",  # numpy refuses negative seeds
    "bank.nprobe": "[0, inf)",  # 0: calibrated to bank.recall_target
    "bank.recall_target": "(0, 1]",
    "bank.recall_sample": "[1, inf)",  # recall on no query would be NaN
    "bank.refine_top": "[0, inf)",
    "bank.shards": "[0, inf)",
    "bank.shard_cpus": "[0, inf)",
    "bank.shard_gpus": "[0, inf)",
    "scoring.k": "[1, inf)",
    # LDKNN's density coefficient: the paper's useful range is about 0..2; far above it the density
    # term alone ranks patches (1e308 overflowed to inf scores: AUROC 50, pixel metrics missing)
    "scoring.alpha": f"[0, {MAX_ALPHA}]",
    "scoring.sigma": "[0, 64]",  # 0: no blur; in pixels of the image (64: a quarter of 256 px)
    "finetune.steps": "[1, inf)",
    "finetune.images_per_step": "[1, inf)",
    "finetune.micro_batch": "[1, inf)",
    "finetune.freeze_steps": "[0, inf)",
    "finetune.lr": "(0, inf)",
    "finetune.momentum": "[0, 1]",
    "finetune.weight_decay": "[0, inf)",
    "finetune.blend_prob": "[0, 1]",
    "finetune.checkpoint_every": "[1, inf)",  # steps are counted modulo it
    "finetune.max_failures": "[0, inf)",
    "finetune.num_workers": "[1, inf)",
    "finetune.cpus_per_worker": "(0, inf)",
    "finetune.data_workers": "[1, inf)",
    "finetune.data_cpus": "(0, inf)",
    "finetune.torch_threads": "[1, inf)",
    "finetune.seed": "[0, inf)",
    "finetune.fail_at_step": "[1, inf)",
    "tracking.heatmap_examples": "[0, inf)",
    "cache.max_gb": "[0, inf)",
    "tune.fraction": "[0, 1)",  # 0: the validation kind's default (0.1 synthetic, 0.3 test)
    "tune.k_min": "[1, inf)",
    "tune.k_max": "[1, inf)",
    "tune.trials": "[1, inf)",
    "tune.map_trials": "[0, inf)",  # 0: no map search
    "tune.map_alpha_max": f"[0, {MAX_ALPHA}]",
    "tune.alpha_min": f"[0, {MAX_ALPHA}]",
    "tune.alpha_max": f"[0, {MAX_ALPHA}]",
    "tune.quantile": "(0, 1)",
    "tune.concurrency": "[0, inf)",  # 0: as many as the cluster has CPUs
    "tune.seed": "[0, inf)",
}
# Choices read only here or as text (the fine-tuning loss tells "ce" from anything else, use_gpu
# compares text), so this is their one list.
FINETUNE_LOSSES = ("bce", "ce")
USE_GPU = ("auto", "true", "false")
FINETUNE_ENGINES = ("ray", "local")


def _choices() -> dict[str, tuple]:
    """section.key -> its allowed values, each list taken from the code that reads the setting.

    Imported here rather than at the top: those modules load torch, and `import reb_dist.config`
    stays light (the CLI's --help, `import reb_dist`); settings are checked once per load.
    """
    from reb_dist.core.anomaly_map import IMAGE_SCORE_REDUCTIONS
    from reb_dist.core.backbones import available_backbones
    from reb_dist.core.defectmaker import TASKS
    from reb_dist.core.feature_engines import ENGINES, PRECISIONS
    from reb_dist.core.features import AGGREGATIONS
    from reb_dist.core.ldknn import CORESET_METHODS
    from reb_dist.core.ldknn.approx import NEIGHBOUR_SEARCHES
    from reb_dist.core.ldknn.search import STORAGE_DTYPES
    from reb_dist.core.ssl_model import BN_STATS
    from reb_dist.core.thresholds import METHODS as THRESHOLDS

    return {
        "preset": tuple(PRESETS),
        "data.layout": tuple(LAYOUTS),
        "backbone.name": tuple(available_backbones()),
        "backbone.aggregation": AGGREGATIONS,
        "backbone.engine": ENGINES,
        "backbone.precision": PRECISIONS,
        "bank.coreset_method": CORESET_METHODS,
        "bank.dtype": STORAGE_DTYPES,
        "bank.neighbour_search": NEIGHBOUR_SEARCHES,
        "bank.query_search": NEIGHBOUR_SEARCHES,
        "scoring.image_score": IMAGE_SCORE_REDUCTIONS,
        "finetune.task": tuple(TASKS),
        "finetune.bn_stats": BN_STATS,
        "finetune.loss": FINETUNE_LOSSES,
        "finetune.use_gpu": USE_GPU,
        "finetune.engine": FINETUNE_ENGINES,
        "tune.validation": VALIDATION_KINDS,
        "tune.threshold": THRESHOLDS,
    }


def _device_problems(device: str) -> list[str]:
    """backbone.device: "auto" or a device torch can parse (what `Detector` passes to torch.device)."""
    if device == "auto":
        return []
    import torch

    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        return [f"backbone.device={device!r} is unknown; allowed: auto, cpu, cuda, cuda:N (or another "
                f"device torch names, e.g. mps)"]
    return []


def _method_problems(scoring: ScoringConfig) -> list[str]:
    """scoring.methods and scoring.map_method, parsed as the scorers parse them (`parse_method`).

    Each spec is parsed with the scorers' defaults: what it inherits (scoring.k, scoring.alpha) is
    checked as those settings, so a bad K is reported once, under its own key.
    """
    from reb_dist.core.ldknn import METHODS, parse_method

    allowed = f"{', '.join(METHODS)}, each optionally with :k=N,alpha=X (N >= 1, 0 <= X <= {MAX_ALPHA})"
    if not scoring.methods:
        return [f"scoring.methods=[] is empty; allowed: one or more of {allowed}"]
    problems = []
    for named, spec in scoring.named_specs():
        try:
            method = parse_method(spec)
        except ValueError as exc:
            problems.append(f"{named} cannot be used ({exc}); allowed: {allowed}")
            continue
        if not (math.isfinite(method.alpha) and 0 <= method.alpha <= MAX_ALPHA):
            problems.append(f"{named} has alpha={method.alpha!r}; allowed: {allowed}")
    return problems


def _bounds(interval: str) -> tuple[float, float, bool, bool]:
    """"(0, 1]" -> (0.0, 1.0, low bound excluded, high bound included) as (low, high, low_in, high_in)."""
    low, high = (float(b) for b in interval[1:-1].split(","))
    return low, high, interval[0] == "[", interval[-1] == "]"


def _in_interval(value: float, interval: str) -> bool:
    low, high, low_in, high_in = _bounds(interval)
    return (low <= value if low_in else low < value) and (value <= high if high_in else value < high)


def _describe(interval: str) -> str:
    """">= 1", "> 0" or "in (0, 1]": an interval as the error message says it."""
    low, high, low_in, _ = _bounds(interval)
    if math.isinf(high):
        return f"{'>=' if low_in else '>'} {low:g}"
    return f"in {interval}"


def _merge(base: dict, values: dict) -> dict:
    """`values` over `base`, section by section (neither is modified)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def apply_override(values: dict, item: str) -> None:
    """Apply one "section.key=value" override to a settings mapping in place (value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected section.key=value")
    *parents, leaf = key.strip().split(".")
    node = values
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {p} is not a section")
    node[leaf] = yaml.safe_load(raw) if raw.strip() else None


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {values!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {unknown}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{where}: {name}")
        else:
            section = "" if cls is RunConfig else cls.__name__.removesuffix("Config").lower() + "."
            kwargs[name] = _coerce(value, hint, f"{where}: {section}{name}")
    return cls(**kwargs)


def _split_list(text: str) -> list[str]:
    """"ldknn:k=5,alpha=0.5,knn" -> ["ldknn:k=5,alpha=0.5", "knn"]: items split at commas, except that a
    `key=value` piece after a method's parameters is the next parameter of that method, not an item."""
    items: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if items and ":" in items[-1] and "=" in piece and ":" not in piece:
            items[-1] += f",{piece}"
        else:
            items.append(piece)
    return items


def _coerce(value, hint, where: str):
    """Check a value against its annotation; ints are accepted for floats, a string for a list."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is list:
        if isinstance(value, str):
            value = _split_list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, where) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, bool):  # e.g. finetune.use_gpu=true
        return str(value).lower()
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value
