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

from .errors import ConfigError

SAMPLE_DATA = Path(__file__).parent / "sample_data" / "mvtec_bottle_256"


@dataclass
class DataConfig:
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
        return SAMPLE_DATA if self.root == "sample" else Path(self.root).expanduser()


@dataclass
class BackboneConfig:
    name: str = "efficientnet_lite0"
    weights: str | None = None  # None: ImageNet; else a weights file (e.g. DefectMaker fine-tuned)
    aggregation: str = "avgpool"  # avgpool (anomalib) | adaptive (PatchCore / REB authors)
    layer_dim: int = 1024  # adaptive only
    target_dim: int = 1024  # adaptive only
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class BankConfig:
    coreset_ratio: float = 1.0  # 1.0 keeps the whole bank (REB's default)
    coreset_projection_dim: int = 128
    seed: int = 0


@dataclass
class ScoringConfig:
    methods: list[str] = field(default_factory=lambda: ["ldknn", "knn", "nn1"])
    k: int = 9  # the authors' MVTec AD default
    alpha: float = 1.0
    squared: bool = True  # squared L2, as the authors' code; False: plain L2 as the paper writes
    image_score: str = "max"  # max | pool3max
    sigma: float = 4.0
    pixel_metrics: bool = True


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "reb-dist"
    run_name: str | None = None
    heatmap_examples: int = 8


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output_dir: str = "outputs"

    @classmethod
    def from_dict(cls, values: dict, source: str = "settings") -> RunConfig:
        return _build(cls, values or {}, source)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | tuple = ()) -> RunConfig:
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
            _set_dotted(values, item)
        return cls.from_dict(values, str(path) if path else "settings")

    def to_dict(self) -> dict:
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
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _set_dotted(values: dict, item: str) -> None:
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
            kwargs[name] = _coerce(value, hint, f"{where}: {cls.__name__.removesuffix('Config').lower()}.{name}")
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
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value
