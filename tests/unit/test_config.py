"""Settings: defaults <- YAML/JSON file <- `section.key=value` overrides, errors that name the setting."""

from __future__ import annotations

import json
import re
from dataclasses import fields

import pytest
import yaml

from reb_dist.config import SAMPLE_DATA, RunConfig
from reb_dist.errors import ConfigError


def test_defaults():
    cfg = RunConfig.load()
    assert cfg.data.layout == "mvtec"
    assert cfg.data.root == "sample" and cfg.data.resolved_root() == SAMPLE_DATA
    assert (SAMPLE_DATA / "bottle" / "train" / "good").is_dir()
    assert cfg.data.categories == [] and cfg.data.image_size == 256 and cfg.data.few_shot == 0
    assert cfg.backbone.name == "efficientnet_lite0" and cfg.backbone.weights is None
    assert cfg.backbone.aggregation == "avgpool" and cfg.backbone.device == "auto"
    assert cfg.bank.coreset_ratio == 1.0 and isinstance(cfg.bank.coreset_ratio, float)
    assert cfg.scoring.methods == ["ldknn", "knn", "nn1"]
    assert cfg.scoring.k == 9 and cfg.scoring.alpha == 1.0 and cfg.scoring.squared is True
    assert cfg.tracking.run_name is None
    assert cfg.output_dir == "outputs"
    # each call gets its own lists (dataclass default factories, not one shared list)
    RunConfig.load().scoring.methods.append("lof")
    assert RunConfig.load().scoring.methods == ["ldknn", "knn", "nn1"]


def test_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "data:\n  root: /datasets/mvtec\n  categories: [bottle, cable]\n  few_shot: 8\n"
        "backbone:\n  name: resnet18\n  weights: /w/r18.pth\n"
        "bank:\n  coreset_ratio: 1\n"  # an int is accepted for a float
        "scoring:\n  methods: ldknn, knn\n  alpha: 0.5\n  squared: false\n"
        "output_dir: out\n"
    )
    cfg = RunConfig.load(path)
    assert cfg.data.root == "/datasets/mvtec" and cfg.data.categories == ["bottle", "cable"]
    assert cfg.data.few_shot == 8 and cfg.data.image_size == 256  # unset keys keep their default
    assert cfg.backbone.name == "resnet18" and cfg.backbone.weights == "/w/r18.pth"
    assert cfg.bank.coreset_ratio == 1.0 and isinstance(cfg.bank.coreset_ratio, float)
    assert cfg.scoring.methods == ["ldknn", "knn"]  # a comma string for a list field
    assert cfg.scoring.alpha == 0.5 and cfg.scoring.squared is False
    assert cfg.output_dir == "out"


def test_json_file_and_empty_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"scoring": {"k": 5}, "data": {"categories": ["pill"]}}))
    cfg = RunConfig.load(path)
    assert cfg.scoring.k == 5 and cfg.data.categories == ["pill"]
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert RunConfig.load(empty) == RunConfig()


def test_overrides_are_yaml_typed():
    cfg = RunConfig.load(None, [
        "data.image_size=224",
        "data.categories=[bottle,pill]",
        "bank.coreset_ratio=0.1",
        "bank.seed=3",
        "scoring.alpha=2",  # int -> float
        "scoring.squared=false",
        "scoring.methods=ldknn:k=5,nn1",  # comma string for a list field
        "backbone.weights=/tmp/w.safetensors",
        "tracking.run_name=my run",
        "output_dir=elsewhere",
    ])
    assert cfg.data.image_size == 224 and isinstance(cfg.data.image_size, int)
    assert cfg.data.categories == ["bottle", "pill"]
    assert cfg.bank.coreset_ratio == pytest.approx(0.1) and cfg.bank.seed == 3
    assert cfg.scoring.alpha == 2.0 and isinstance(cfg.scoring.alpha, float)
    assert cfg.scoring.squared is False
    assert cfg.scoring.methods == ["ldknn:k=5", "nn1"]
    assert cfg.backbone.weights == "/tmp/w.safetensors"
    assert cfg.tracking.run_name == "my run"
    assert cfg.output_dir == "elsewhere"


def test_null_and_empty_overrides():
    cfg = RunConfig.load(None, ["backbone.weights=/w.pth", "tracking.run_name=x"])
    assert cfg.backbone.weights == "/w.pth"
    cfg = RunConfig.load(None, ["backbone.weights=null", "tracking.run_name="])
    assert cfg.backbone.weights is None and cfg.tracking.run_name is None
    # a number for a str setting stays that text; a single name for a list becomes a one-item list
    cfg = RunConfig.load(None, ["data.root=2024", "data.categories=bottle"])
    assert cfg.data.root == "2024" and cfg.data.categories == ["bottle"]


def test_overrides_win_over_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("scoring:\n  k: 5\n  alpha: 0.5\n")
    cfg = RunConfig.load(path, ["scoring.k=7"])
    assert cfg.scoring.k == 7 and cfg.scoring.alpha == 0.5


@pytest.mark.parametrize("override,named", [
    ("data.imagesize=128", "imagesize"),
    ("scoring.kk=3", "kk"),
    ("nosuch.key=1", "nosuch"),
])
def test_unknown_setting_is_named(override, named):
    with pytest.raises(ConfigError, match=re.escape(repr(named))):
        RunConfig.load(None, [override])


def test_unknown_setting_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("scoring:\n  kay: 3\n")
    with pytest.raises(ConfigError) as exc:
        RunConfig.load(path)
    assert str(path) in str(exc.value) and "'kay'" in str(exc.value)


@pytest.mark.parametrize("override,named", [
    ("data.image_size=abc", "data.image_size"),
    ("data.image_size=12.5", "data.image_size"),
    ("scoring.k=true", "scoring.k"),  # a bool is not an int
    ("scoring.squared=1", "scoring.squared"),  # nor an int a bool
    ("scoring.alpha=fast", "scoring.alpha"),
    ("bank.coreset_ratio=[0.1]", "bank.coreset_ratio"),
    ("data.categories={a: 1}", "data.categories"),
    ("scoring.methods=[[ldknn]]", "scoring.methods"),
])
def test_wrong_type_names_section_and_key(override, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        RunConfig.load(None, [override])


@pytest.mark.parametrize("override", ["scoring.k", "=3", "scoring.k:3"])
def test_malformed_override(override):
    with pytest.raises(ConfigError, match="section.key=value"):
        RunConfig.load(None, [override])


def test_override_into_a_plain_setting_is_an_error():
    with pytest.raises(ConfigError):
        RunConfig.load(None, ["output_dir.x=1"])


def test_missing_or_bad_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        RunConfig.load(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("scoring: [unclosed\n")
    with pytest.raises(ConfigError, match=re.escape(str(bad))):
        RunConfig.load(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=re.escape(str(listing))):
        RunConfig.load(listing)


def test_flat_gives_mlflow_params():
    cfg = RunConfig.load(None, ["data.categories=[bottle]", "backbone.weights=null"])
    flat = cfg.flat()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in flat.items())
    # one key per setting, named section.key (top-level settings by their own name)
    expected = set()
    for f in fields(RunConfig):
        value = getattr(cfg, f.name)
        expected |= {f"{f.name}.{g.name}" for g in fields(value)} if hasattr(value, "__dataclass_fields__") \
            else {f.name}
    assert set(flat) == expected
    assert flat["data.categories"] == '["bottle"]' and json.loads(flat["scoring.methods"]) == ["ldknn", "knn", "nn1"]
    assert flat["data.image_size"] == "256"
    assert flat["bank.coreset_ratio"] == "1.0"
    assert flat["scoring.squared"] == "True"
    assert flat["backbone.weights"] == "None"
    assert flat["output_dir"] == "outputs"
    assert max(len(v) for v in flat.values()) <= 6000  # MLflow's param value limit


def test_dump_and_load_round_trip(tmp_path):
    cfg = RunConfig.load(None, [
        "data.categories=[bottle,pill]", "data.root=2024", "backbone.weights=/w.pth",
        "bank.coreset_ratio=0.25", "scoring.methods=ldknn:k=5,knn", "scoring.squared=false",
        "tracking.run_name=null", "output_dir=o u t",
    ])
    path = tmp_path / "dumped.yaml"
    path.write_text(cfg.to_yaml())
    assert isinstance(yaml.safe_load(path.read_text()), dict)
    again = RunConfig.load(path)
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    assert again.flat() == cfg.flat()


def test_scientific_floats_and_boolean_strings_are_accepted():
    cfg = RunConfig.load(None, ["scoring.alpha=1e-3", "finetune.use_gpu=true"])
    assert cfg.scoring.alpha == 1e-3 and cfg.finetune.use_gpu == "true"
