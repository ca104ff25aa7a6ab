"""Settings are checked before any data is read: every choice and range when the config is loaded,
few_shot when a split is loaded, K against the bank before any density search, and every category's
files before the first category is computed. Each error names the setting, its value and what is allowed,
and the CLI prints it on one line, without a traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reb_dist.cli import main
from reb_dist.config import SAMPLE_DATA, RunConfig
from reb_dist.core.anomaly_map import IMAGE_SCORE_REDUCTIONS
from reb_dist.core.detector import Detector
from reb_dist.core.features import AGGREGATIONS
from reb_dist.core.ldknn import CORESET_METHODS, METHODS
from reb_dist.core.ldknn.approx import NEIGHBOUR_SEARCHES
from reb_dist.core.ldknn.bank_stats import BankStats
from reb_dist.core.ldknn.search import STORAGE_DTYPES
from reb_dist.core.thresholds import METHODS as THRESHOLDS
from reb_dist.errors import ConfigError, DatasetError
from reb_dist.io.data import LAYOUTS
from reb_dist.pipelines import evaluate as evaluate_module
from reb_dist.commands import fit as fit_command
from reb_dist.commands.benchmark import benchmark
from reb_dist.commands.fit import fit
from reb_dist.pipelines.validation import KINDS

# (overrides, the key and value the message names, what it says is allowed)
BAD_SETTINGS = [
    (["scoring.k=0"], "scoring.k=0", ">= 1"),
    (["scoring.k=-3"], "scoring.k=-3", ">= 1"),
    (["scoring.alpha=nan"], "scoring.alpha=nan", "a finite number"),
    (["scoring.alpha=.inf"], "scoring.alpha=inf", "a finite number"),
    (["scoring.methods=patchcore"], "scoring.methods entry 'patchcore'", ", ".join(METHODS)),
    (["scoring.methods=[ldknn, 'knn:k=0']"], "scoring.methods entry 'knn:k=0'", ", ".join(METHODS)),
    (["scoring.methods=ldknn:beta=2"], "scoring.methods entry 'ldknn:beta=2'", ", ".join(METHODS)),
    (["scoring.methods=[]"], "scoring.methods=[]", ", ".join(METHODS)),
    (["scoring.map_method=patchcore"], "scoring.map_method='patchcore'", ", ".join(METHODS)),
    (["scoring.map_method='ldknn:k=0'"], "scoring.map_method='ldknn:k=0'", ", ".join(METHODS)),
    (["scoring.image_score=mean"], "scoring.image_score='mean'", ", ".join(IMAGE_SCORE_REDUCTIONS)),
    (["scoring.sigma=-1"], "scoring.sigma=-1.0", "in [0, 64]"),
    (["scoring.sigma=1e9"], "scoring.sigma=1000000000.0", "in [0, 64]"),
    # finite is not enough: 1e308 overflowed every score to inf (AUROC 50.0, pixel metrics missing)
    (["scoring.alpha=1e308"], "scoring.alpha=1e+308", "in [0, 100]"),
    (["scoring.alpha=-1"], "scoring.alpha=-1.0", "in [0, 100]"),
    (["scoring.methods=[ldknn:alpha=1e308]"], "scoring.methods entry 'ldknn:alpha=1e308'", "0 <= X <= 100"),
    (["scoring.map_method='ldknn:alpha=500'"], "scoring.map_method='ldknn:alpha=500'", "0 <= X <= 100"),
    (["tune.alpha_max=1e308"], "tune.alpha_max=1e+308", "in [0, 100]"),
    (["backbone.engine=tensorrt"], "backbone.engine='tensorrt'", "auto, torch, onnxruntime"),
    (["backbone.threads=-1"], "backbone.threads=-1", ">= 0"),
    (["data.layout=foo"], "data.layout='foo'", ", ".join(LAYOUTS)),
    (["data.image_size=0"], "data.image_size=0", ">= 1"),
    (["data.batch_size=0"], "data.batch_size=0", ">= 1"),
    (["data.few_shot=-1"], "data.few_shot=-1", ">= 0"),
    (["backbone.name=patchnet"], "backbone.name='patchnet'", "efficientnet_lite0"),
    (["backbone.aggregation=max"], "backbone.aggregation='max'", ", ".join(AGGREGATIONS)),
    (["backbone.device=gpu"], "backbone.device='gpu'", "auto, cpu, cuda"),
    (["bank.query_search=fast"], "bank.query_search='fast'", ", ".join(NEIGHBOUR_SEARCHES)),
    (["bank.neighbour_search=brute"], "bank.neighbour_search='brute'", ", ".join(NEIGHBOUR_SEARCHES)),
    (["bank.coreset_method=kmeans"], "bank.coreset_method='kmeans'", ", ".join(CORESET_METHODS)),
    (["bank.dtype=float64"], "bank.dtype='float64'", ", ".join(STORAGE_DTYPES)),
    (["bank.coreset_ratio=0"], "bank.coreset_ratio=0.0", "in (0, 1]"),
    (["bank.coreset_ratio=1.5"], "bank.coreset_ratio=1.5", "in (0, 1]"),
    (["bank.recall_sample=0"], "bank.recall_sample=0", ">= 1"),
    (["tune.validation=holdout"], "tune.validation='holdout'", ", ".join(KINDS)),
    (["tune.threshold=youden"], "tune.threshold='youden'", ", ".join(THRESHOLDS)),
    (["tune.fraction=1"], "tune.fraction=1.0", "in [0, 1)"),
    (["tune.fraction=-0.1"], "tune.fraction=-0.1", "in [0, 1)"),
    (["tune.quantile=0"], "tune.quantile=0.0", "in (0, 1)"),
    (["tune.quantile=1"], "tune.quantile=1.0", "in (0, 1)"),
    (["tune.k_min=10", "tune.k_max=5"], "tune.k_min=10 is more than tune.k_max=5", "tune.k_min <= tune.k_max"),
    (["tune.alpha_min=2", "tune.alpha_max=1"], "tune.alpha_min=2.0", "tune.alpha_min <= tune.alpha_max"),
    (["tune.trials=0"], "tune.trials=0", ">= 1"),
    (["finetune.loss=mse"], "finetune.loss='mse'", "bce, ce"),
    (["finetune.use_gpu=maybe"], "finetune.use_gpu='maybe'", "auto, true, false"),
    (["finetune.task=scratches"], "finetune.task='scratches'", "defectmaker"),
    (["finetune.bn_stats=reset"], "finetune.bn_stats='reset'", "update, frozen"),
    (["finetune.blend_prob=2"], "finetune.blend_prob=2.0", "in [0, 1]"),
    (["finetune.checkpoint_every=0"], "finetune.checkpoint_every=0", ">= 1"),
    (["cache.max_gb=-1"], "cache.max_gb=-1.0", ">= 0"),
]


@pytest.mark.parametrize("overrides,named,allowed", BAD_SETTINGS, ids=[" ".join(o) for o, _, _ in BAD_SETTINGS])
def test_a_bad_setting_is_refused_when_the_config_is_loaded(overrides, named, allowed, tmp_path):
    # the root does not exist: an error about it would mean data was looked at before the settings
    with pytest.raises(ConfigError) as exc:
        RunConfig.load(None, [f"data.root={tmp_path / 'missing'}", *overrides])
    message = str(exc.value)
    assert named in message and allowed in message, message
    assert "\n" not in message  # one line


def test_a_bad_setting_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("scoring:\n  k: 0\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: scoring\.k=0 is out of range; allowed: >= 1"):
        RunConfig.load(path)


def test_every_bad_setting_is_named_at_once():
    with pytest.raises(ConfigError) as exc:
        RunConfig.load(None, ["scoring.k=0", "data.layout=foo", "scoring.methods=patchcore"])
    assert all(s in str(exc.value) for s in ("scoring.k=0", "data.layout='foo'", "'patchcore'"))


@pytest.mark.parametrize("overrides", [
    *([f"data.layout={layout}"] for layout in LAYOUTS),
    *([f"scoring.methods={name}:k=5,alpha=0.5", f"scoring.map_method={name}"] for name in METHODS),
    ["scoring.methods=[ldknn, 'knn:k=1']", "scoring.k=1", "scoring.alpha=0", "scoring.sigma=0"],
    ["backbone.device=cpu"], ["backbone.device=cuda:1"], ["bank.coreset_ratio=1"], ["bank.coreset_ratio=0.001"],
    ["tune.fraction=0"], ["tune.k_min=5", "tune.k_max=5"], ["tune.threshold=quantile", "tune.quantile=0.5"],
    ["preset=fast"], ["finetune.use_gpu=true"], ["finetune.fail_at_step=null"],
])
def test_every_allowed_value_still_loads(overrides):
    RunConfig.load(None, overrides)


def test_a_method_with_several_parameters_stays_one_method():
    # as --methods' help says: the comma between a method's parameters does not start a new method
    cfg = RunConfig.load(None, ["scoring.methods=ldknn:k=5,alpha=0.5,knn"])
    assert cfg.scoring.methods == ["ldknn:k=5,alpha=0.5", "knn"]


def test_the_shipped_configs_pass_the_checks():
    repo = Path(__file__).parents[2]
    for path in (repo / "jobs" / "sample_benchmark.yaml", repo / "tune" / "k_alpha.yaml"):
        RunConfig.load(path)


def test_importing_the_settings_stays_light():
    # the choice lists live in modules that load torch: they are read when settings are checked
    out = subprocess.run([sys.executable, "-c", "import sys, reb_dist.config; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- the CLI -------------------------------------------------------------------------------------------------


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def no_data_read(monkeypatch):
    """Any split loaded or feature extracted fails the test: what it checks happens before either."""
    def refuse(*args, **kwargs):
        raise AssertionError("data was read before the settings were checked")

    monkeypatch.setattr(evaluate_module, "load_category", refuse)
    monkeypatch.setattr(fit_command, "load_category", refuse)
    monkeypatch.setattr(Detector, "extract", refuse)


@pytest.mark.parametrize("command,args,named", [
    ("benchmark", ["--set", "scoring.k=0"], "scoring.k=0"),
    ("benchmark", ["--set", "scoring.alpha=nan"], "scoring.alpha=nan"),
    ("benchmark", ["--set", "data.layout=foo"], "data.layout='foo'"),
    ("fit", ["--methods", "patchcore"], "'patchcore'"),
    ("fit", ["--set", "bank.coreset_ratio=2"], "bank.coreset_ratio=2.0"),
    ("evaluate", ["-m", "nowhere.safetensors", "--set", "tune.validation=holdout"], "tune.validation='holdout'"),
])
def test_the_cli_prints_one_line_and_no_traceback(command, args, named, workdir, no_data_read, capsys):
    assert main([command, "--no-mlflow", *args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and named in err and "\n" not in err
    assert "Traceback" not in captured.err + captured.out
    assert not (workdir / "outputs").exists()  # no model, no results


def test_the_cli_as_a_process_shows_no_traceback(workdir):
    out = subprocess.run([sys.executable, "-m", "reb_dist.cli", "benchmark", "--no-mlflow", "--set", "scoring.k=0"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: settings: scoring.k=0 is out of range; allowed: >= 1"]


# --- what depends on the data --------------------------------------------------------------------------------


class _Extracted(Exception):
    """Raised in place of feature extraction: what these tests check happens before it."""


@pytest.fixture
def extractions(monkeypatch):
    """Counts feature extractions and stops at the first."""
    calls = []

    def stop(self, *args, **kwargs):
        calls.append(kwargs.get("desc"))
        raise _Extracted

    monkeypatch.setattr(Detector, "extract", stop)
    return calls


def _mvtec(root, categories=("bottle",)):
    """An MVTec-layout root with the bundled bottle subset under each category name."""
    for category in categories:
        shutil.copytree(SAMPLE_DATA / "bottle", root / category)
    return root


def _settings(root, *overrides):
    return RunConfig.load(None, [f"data.root={root}", "backbone.device=cpu", "tracking.enabled=false",
                                 "cache.enabled=false", f"output_dir={root.parent / 'out'}", *overrides])


def test_a_truncated_image_in_the_second_category_stops_the_benchmark_before_the_first(tmp_path, extractions):
    root = _mvtec(tmp_path / "data", ("alpha", "beta"))
    broken = root / "beta" / "test" / "good" / "008.png"
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.raises(DatasetError) as exc:
        benchmark(_settings(root))
    assert exc.value.path == broken
    assert extractions == []  # no feature of "alpha" was computed
    assert not (tmp_path / "out").exists()  # and no results half-written


def test_the_benchmark_names_every_category_with_a_bad_file(tmp_path, extractions, workdir, capsys):
    root = _mvtec(tmp_path / "data", ("alpha", "beta", "gamma"))
    broken = [root / c / "train" / "good" / "014.png" for c in ("alpha", "gamma")]
    for path in broken:
        path.write_bytes(path.read_bytes()[:200])
    assert main(["benchmark", "--no-mlflow", "--root", str(root), "--set", "output_dir=out"]) == 2
    err = capsys.readouterr().err
    assert all(f"{path}: cannot be read as an image" in err for path in broken) and "Traceback" not in err
    assert extractions == [] and not (workdir / "out").exists()


def test_few_shot_larger_than_the_class_names_the_setting(tmp_path, extractions):
    root = _mvtec(tmp_path / "data", ("alpha", "beta"))
    for extra in sorted((root / "beta" / "train" / "good").glob("*.png"))[3:]:
        extra.unlink()  # beta has 3 training images, alpha 16
    with pytest.raises(ConfigError, match=r"data\.few_shot=8 .* 'beta' has \(3 in .*allowed: 1 to 3"):
        benchmark(_settings(root, "data.few_shot=8"))
    assert extractions == []


@pytest.mark.parametrize("overrides,named,k", [
    (["scoring.k=20"], "scoring.k", 20),
    (["scoring.methods=[ldknn, 'knn:k=40']"], "scoring.methods entry 'knn:k=40'", 40),
    (["scoring.methods=[knn]", "scoring.map_method='ldknn:k=17'"], "scoring.map_method='ldknn:k=17'", 17),
])
def test_k_larger_than_the_bank_is_refused_before_any_density_search(overrides, named, k, tmp_path, monkeypatch):
    searched = []
    monkeypatch.setattr(BankStats, "neighbours", lambda self, *a, **kw: searched.append(a) or 1 / 0)
    root = _mvtec(tmp_path / "data")
    # one training image at 32 px: a 4 x 4 feature grid, a bank of 16 points
    cfg = _settings(root, "data.few_shot=1", "data.image_size=32", *overrides)
    model = tmp_path / "bottle.safetensors"
    with pytest.raises(ConfigError) as exc:
        fit(cfg, str(model))
    message = str(exc.value)
    assert f"{named}: K={k}" in message and "'bottle' has 16" in message and "K up to 15" in message
    assert searched == [] and not model.exists()
