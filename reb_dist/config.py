"""One settings object per run: defaults <- a YAML/JSON file <- `section.key=value` overrides.

The flattened settings are logged with every MLflow run, so a result always says how it was made.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from reb_dist.errors import ConfigError

SAMPLE_DATA = Path(__file__).parent / "sample_data" / "mvtec_bottle_256"


@dataclass
class DataConfig:
    """Where the images are and how they are read (section `data`)."""

    layout: str = "mvtec"  # mvtec | loco | btad | mvtec3d | folder
    root: str = "sample"  # "sample": the MVTec AD bottle subset shipped with the package
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
        """The dataset root as a Path ("sample" is the bundled bottle subset)."""
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


@dataclass
class BankConfig:
    """How the memory bank is reduced, stored, searched and placed (section `bank`)."""

    coreset_ratio: float = 1.0  # 1.0 keeps the whole bank (REB's default)
    coreset_projection_dim: int = 128
    coreset_method: str = "fast"  # fast (batched exact greedy) | greedy (PatchCore's serial loop) | random
    seed: int = 0
    dtype: str = "float32"  # float32 | float16 (half the memory; vectors rounded to half precision)
    # how bank densities find each bank point's K neighbours: exact | ivf | hnsw | auto (exact up to
    # 1M points, IVF above; see reb_dist/core/ldknn/approx.py)
    neighbour_search: str = "auto"
    # IVF lists visited per query; 0: 1/48 of the lists (74 at 780k points, where 64 gave recall@9 0.9975)
    nprobe: int = 0
    # how test patches find their nearest bank points: exact | ivf | hnsw | auto (as neighbour_search);
    # approximate candidates are re-ranked exactly, and every run reports its recall against exact
    query_search: str = "exact"
    recall_sample: int = 2000  # queries (seeded) whose approximate neighbours are checked against exact
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
    """MLflow: on/off, store URI, experiment, run name, heatmap examples (section `tracking`)."""

    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "reb-dist"
    run_name: str | None = None
    heatmap_examples: int = 8


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
    threshold: str = "f1"  # f1 | quantile: how the image threshold is taken from validation scores
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
    # a named set of defaults (PRESETS) under the file and the overrides: "exact" (the default) or "fast"
    preset: str = "exact"

    @classmethod
    def from_dict(cls, values: dict, source: str = "settings") -> RunConfig:
        """Settings from a nested mapping, every key and type checked (errors name `source`).

        A `preset` in the mapping supplies defaults for what the mapping does not set itself.
        """
        values = values or {}
        preset = values.get("preset", "exact") if isinstance(values, dict) else "exact"
        if preset not in PRESETS:
            raise ConfigError(f"{source}: preset {preset!r} is unknown; known: {sorted(PRESETS)}")
        return _build(cls, _merge(PRESETS[preset], values), source)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | tuple = ()) -> RunConfig:
        """Defaults <- the YAML/JSON file at `path` (if any) <- `section.key=value` overrides."""
        values: dict = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"{path}: config file not found")
            try:
                values = yaml.safe_load(path.read_text()) or {}  # YAML is a superset of JSON
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML/JSON ({exc})") from exc
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: must hold a mapping of sections, not {type(values).__name__}")
        for item in overrides:
            apply_override(values, item)
        return cls.from_dict(values, str(path) if path else "settings")

    def to_dict(self) -> dict:
        """The settings as a nested dict of plain values."""
        return asdict(self)

    def flat(self) -> dict[str, str]:
        """section.key -> value as text: the form MLflow params take."""
        out = {}
        for section, values in self.to_dict().items():
            if isinstance(values, dict):
                out.update({f"{section}.{k}": json.dumps(v) if isinstance(v, list) else str(v)
                            for k, v in values.items()})
            else:
                out[section] = str(values)
        return out

    def dump(self, path: str | Path) -> None:
        """Write the settings as YAML (loadable with `RunConfig.load`), atomically."""
        from reb_dist.io.atomic import write_text_atomic

        write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


# Named defaults, applied under a run's file and overrides (`--preset fast`). "fast" trades a little
# accuracy for an order of magnitude in time; its choices and their measured cost are in
# docs/RESULTS.md ("Speed"). The default, "exact", changes nothing.
PRESETS: dict[str, dict] = {
    "exact": {},
    "fast": {"bank": {"coreset_ratio": 0.1, "coreset_method": "fast", "query_search": "ivf",
                      "neighbour_search": "ivf", "nprobe": 0}},
}


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
            value = [v.strip() for v in value.split(",") if v.strip()]
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
