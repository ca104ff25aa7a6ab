"""A tiny per-class K/alpha search with real Ray Tune + Optuna, real features and a real MLflow store."""

import json
import os
import signal

import mlflow
import pytest

from reb_dist.cli import main
from reb_dist.config import SAMPLE_DATA


def test_tiny_tune_writes_its_choice_keeps_validation_apart_and_finishes_every_run(local_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # at 128 px (the features of a quarter of the default's pixels): the search, its splits and its runs
    # are what is checked, not the scores
    settings = ["data.categories=[bottle]", "data.image_size=128", "tune.validation=test", "tune.fraction=0.34", "tune.trials=3", "tune.map_trials=3", "tune.k_max=12",
                "tune.multi_objective=true", "tune.concurrency=2", f"tune.storage_path={tmp_path / 'ray'}", f"tracking.uri={uri}",
                "output_dir=out"]
    assert main(["tune", *[a for s in settings for a in ("--set", s)]]) == 0

    out = tmp_path / "out" / "tune"
    selection = json.loads((out / "selection.json").read_text())
    chosen = selection["per_class"]["bottle"]
    assert 1 <= chosen["k"] <= 12 and 0.0 <= chosen["alpha"] <= 2.0 and chosen["trials"] == 3
    assert (out / "selection.csv").read_text().splitlines()[1].startswith(f"bottle,{chosen['k']},")

    split = json.loads((out / "splits.json").read_text())["bottle"]
    validation, reported = set(split["validation"]), set(split["reported_test"])
    assert validation and reported and not validation & reported
    all_test = {str(p) for p in (SAMPLE_DATA / "bottle" / "test").rglob("*.png")}
    assert validation | reported == all_test
    rows = json.loads((out / "results.json").read_text())["results"]
    assert {r["variant"] for r in rows} == {"default", "global", "per_class", "per_class_decoupled", "global_decoupled",
                                            "per_class_pareto"}
    assert chosen["map_method"].split(":")[0] in ("ldknn", "knn") and chosen["map_trials"] == 3
    decoupled = next(r for r in rows if r["variant"] == "per_class_decoupled")
    assert decoupled["map_method"] == chosen["map_method"] and (decoupled["k"], decoupled["alpha"]) == (
        chosen["k"], chosen["alpha"])
    assert all("f1_at_threshold" in r["metrics"] and "image_f1" in r["metrics"] for r in rows)
    assert 0 < chosen["calibration"]["threshold"]
    assert all(r["test_images"] == len(reported) for r in rows)  # metrics on the reported part only
    per_class = next(r for r in rows if r["variant"] == "per_class")
    assert (per_class["k"], per_class["alpha"]) == (chosen["k"], chosen["alpha"])

    # the coupled multi-objective search: a Pareto front, mutually non-dominated, and its choice
    front, choice = chosen["pareto"], chosen["pareto_choice"]
    assert front and choice in front
    pairs = [(p["val_image_auroc"], p["map_objective"]) for p in front]
    assert not any(a != b and a[0] >= b[0] and a[1] >= b[1] for a in pairs for b in pairs)  # none dominates another
    assert all(1 <= p["k"] <= 12 and 0.0 <= p["alpha"] <= 2.0 for p in front)
    pareto_row = next(r for r in rows if r["variant"] == "per_class_pareto")
    assert (pareto_row["k"], pareto_row["alpha"], pareto_row["map_method"]) == (choice["k"], choice["alpha"], "")
    assert (out / "pareto_bottle.png").stat().st_size > 1000

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("reb-dist").experiment_id])
    assert runs and all(r.info.status == "FINISHED" for r in runs)
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1 and parent[0].data.params["tune.trials"] == "3"
    class_run = next(r for r in runs if r.data.tags.get("kind") == "class")
    assert class_run.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
    assert class_run.data.params["selected.k"] == str(chosen["k"])
    trials = [r for r in runs if r.data.tags.get("kind") == "trial"]
    assert class_run.data.params["selected.map_method"] == chosen["map_method"]
    assert len(trials) == 9 and all(r.data.tags["mlflow.parentRunId"] == class_run.info.run_id for r in trials)
    # 3 image trials, 3 map trials, 3 coupled two-objective trials
    assert sum("val_image_auroc" in r.data.metrics and "map_objective" not in r.data.metrics for r in trials) == 3
    assert sum("map_objective" in r.data.metrics and "val_image_auroc" not in r.data.metrics for r in trials) == 3
    assert class_run.data.params["selected.pareto_k"] == str(choice["k"])
    assert {"pareto_bottle.png", "pareto_bottle.json"} <= {a.path for a in client.list_artifacts(class_run.info.run_id)}

    # the choice goes into a model: its settings, its threshold, its bank without the held-out images
    assert main(["fit", "--categories", "bottle", "--selection", str(out / "selection.json"), "-o", "bottle.safetensors",
                 "--set", "tracking.enabled=false", "--set", "data.image_size=128"]) == 0
    from reb_dist.io.model_file import load_model

    from reb_dist.detectors import detector_scoring_settings

    model = load_model("bottle.safetensors")
    scoring = detector_scoring_settings(model)
    assert (scoring.k, scoring.alpha, scoring.map_method) == (chosen["k"], chosen["alpha"], chosen["map_method"])
    assert model.calibration.threshold == chosen["calibration"]["threshold"]

    # the comparison report is built from the store alone
    assert main(["report", "--tracking-uri", uri, "-o", "report"]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    for variant in ("default", "global", "per_class"):
        assert f"| bottle | efficientnet_lite0 | imagenet | ldknn[{variant}]" in report
    assert (tmp_path / "report" / "k_alpha_bottle.png").stat().st_size > 1000
    assert (tmp_path / "report" / "auroc_by_class.png").is_file()
    assert (tmp_path / "report" / "pareto_bottle.png").stat().st_size > 1000


def test_search_k_alpha_selects_on_validation_not_on_the_reported_test_images(local_ray, tmp_path, monkeypatch):
    import reb_dist.distributed.tuning as tuning
    from reb_dist.config import ScoringConfig, TrackingConfig, TuneConfig
    from tests.unit.pipelines.test_tune_selection import CROSSOVER, disagreeing_tables

    bars = []  # the search's progress bar: one step per trial that ended
    make = tuning.progress_bar
    monkeypatch.setattr(tuning, "progress_bar", lambda **kwargs: bars.append(make(**kwargs)) or bars[-1])
    tune = TuneConfig(k_min=1, k_max=8, alpha_min=0.0, alpha_max=1.0, trials=16, concurrency=2,
                      storage_path=str(tmp_path / "ray"))
    selection = tuning.search_k_alpha(disagreeing_tables(), tune, ScoringConfig(), TrackingConfig(enabled=False), "t")
    assert selection.alpha < CROSSOVER and selection.val_metrics["objective"] == 1.0
    assert selection.trials == 16
    assert [(b.n, b.total, b.unit) for b in bars] == [(16, 16, "trial")] and "tune-" in bars[0].desc


def _signal_the_driver_once(config: dict, driver: int, signum: int, marker: str) -> dict:
    """A trial that signals the driver (as Ctrl-C, or Tune's SIGUSR1 stop, would), only the first time."""
    import os

    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        os.kill(driver, signum)
    except FileExistsError:
        pass
    return {"objective": float(config["x"])}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGUSR1], ids=["ctrl-c", "sigusr1"])
def test_a_search_stopped_by_a_signal_raises_instead_of_choosing_from_its_partial_trials(local_ray, tmp_path, signum):
    # Ray Tune catches SIGINT (and SIGUSR1), ends its run and returns the trials that finished: `reb tune`
    # went on to choose from those (exit 0), or failed with a "No best trial" traceback
    from ray import tune

    from reb_dist.config import TrackingConfig, TuneConfig
    from reb_dist.distributed.tuning import _search

    data = dict(driver=os.getpid(), signum=int(signum), marker=str(tmp_path / "signalled"))
    t = TuneConfig(trials=8, concurrency=1, storage_path=str(tmp_path / "ray"))
    # Ctrl-C as in a terminal, however pytest was started (a shell's background job ignores SIGINT)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            _search(_signal_the_driver_once, data, {"x": tune.uniform(0, 1)}, "objective", t.trials, t, "interrupted", "bottle",
                    TrackingConfig(enabled=False), None)
        assert (tmp_path / "signalled").exists()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is Python's again
    finally:
        signal.signal(signal.SIGINT, before)
