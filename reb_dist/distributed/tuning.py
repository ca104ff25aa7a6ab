"""Ray Tune + Optuna searches of LDKNN's image score and anomaly map settings on one class's
validation neighbour table: the thin Ray layer of `reb tune` (reb_dist.commands.tune runs them per
class and keeps the record).

The class's `NeighbourTable` (K up to tune.k_max) goes into Ray's object store once
(`tune.with_parameters`); every trial only gathers and subtracts. Each search has its own validation
objective: the image score's (K, alpha) on image AUROC (pixel AUROC only breaks ties), the map's
(method, K, alpha) on pixel AUROC and AUPRO, and, with tune.multi_objective, one coupled (K, alpha)
on both at once (Optuna multi-objective; its Pareto front gives the choice). Trials are logged as
MLflow runs under the class's run by Ray Tune's MLflow callback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import numpy as np

from reb_dist.config import ScoringConfig, TrackingConfig, TuneConfig
from reb_dist.core.anomaly_map import image_scores, pixel_maps
from reb_dist.core.ldknn import ScoringMethod
from reb_dist.core.ldknn.selection import NeighbourTable, ldknn_maps, map_objective, method_maps, validation_objective
from reb_dist.environ import environ_restored
from reb_dist.progress import progress_bar
from reb_dist.pipelines.selection import (ClassTables, Selection, coupled_validation,
                                          pareto_choice, pareto_front)

log = logging.getLogger(__name__)
PARETO_METRICS = ("val_image_auroc", "map_objective")  # the coupled search's two objectives, both maximised


# The trials: one setting's validation metrics, pure functions of (config, the class's validation data)


def image_trial(config: dict, table: NeighbourTable, labels: np.ndarray, masks, image_score: str,
                squared: bool) -> dict:
    maps = ldknn_maps(table, int(config["k"]), float(config["alpha"]), squared)
    return validation_objective(maps, labels, masks, lambda m: image_scores(m, image_score))


def map_trial(config: dict, table: NeighbourTable, pixel_masks: np.ndarray, keep: np.ndarray, sigma: float,
              squared: bool) -> dict:
    patch = method_maps(table, config["method"], int(config["k"]), float(config["alpha"]), squared)
    return map_objective(pixel_maps(patch, pixel_masks.shape[-1], sigma), pixel_masks, keep)


def pareto_trial(config: dict, table: NeighbourTable, labels: np.ndarray, masks, pixel_masks: np.ndarray,
                 keep: np.ndarray, image_score: str, sigma: float, squared: bool) -> dict:
    maps = ldknn_maps(table, int(config["k"]), float(config["alpha"]), squared)
    image = validation_objective(maps, labels, masks, lambda m: image_scores(m, image_score))
    return {**image, **map_objective(pixel_maps(maps, pixel_masks.shape[-1], sigma), pixel_masks, keep)}


def one_step_trainable(trial):
    """A Ray Tune class trainable whose trial is one call of `trial(config, **data)` in one step.

    Not a function trainable: Tune runs those in a thread of the trial's actor, and before re-using
    the actor for the next trial it waits only TUNE_FUNCTION_THREAD_TIMEOUT_S (2 s) for that thread to
    end. On a loaded machine it may not have ended; Ray 2.60 then errors the next trial ("Could not
    re-use actor") and, as measured here, the search hangs for good (Ray alone does it: 12 trials
    of a one-line function at 0.5 CPU, actor reuse on, that timeout at 0). A class trainable's step
    runs in the actor's main thread, so re-using the actor has nothing to wait for.
    """
    from ray import tune

    class OneStep(tune.Trainable):
        def setup(self, config: dict, **data):
            self._data = data  # the class's validation data, from the object store (tune.with_parameters)

        def step(self) -> dict:
            return {**trial(self.config, **self._data), "done": True}

        def reset_config(self, new_config: dict) -> bool:
            return True  # a trial keeps nothing of its own: step reads self.config, which Tune has set

    OneStep.__name__ = OneStep.__qualname__ = trial.__name__
    return OneStep


def _search(trial, data: dict, param_space: dict, metric: str | list[str], trials: int, t: TuneConfig, name: str,
            category: str, tracking: TrackingConfig, mlflow_parent: str | None):
    """Run one Optuna search with Ray Tune and return its results (every trial must succeed); a trial
    is `trial(config, **data)` (`one_step_trainable`), `data` put in Ray's object store once; a list
    of metrics is a multi-objective search, every one maximised."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    import ray

    concurrency = t.concurrency or max(1, int(ray.cluster_resources().get("CPU", 1)))
    bar = progress_bar(total=trials, desc=name, unit="trial", leave=False)  # the name says the class
    callbacks = [trial_progress(bar)]
    if tracking.enabled and mlflow_parent:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        from reb_dist.io.tracking import resolve_uri

        callbacks.append(MLflowLoggerCallback(
            tracking_uri=resolve_uri(tracking.uri), experiment_name=tracking.experiment, save_artifact=False,
            tags={"mlflow.parentRunId": mlflow_parent, "category": category, "kind": "trial"}))
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(one_step_trainable(trial), **data), {"cpu": 0.5}),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=OptunaSearch(metric=metric, mode=["max"] * len(metric) if isinstance(metric, list)
                                    else "max", seed=t.seed),
            num_samples=trials, max_concurrent_trials=concurrency,
            reuse_actors=True,  # a trial is milliseconds of numpy; a new worker per trial was ~10 s of imports
            trial_name_creator=lambda run: f"{category}-{run.trial_id}"),
        run_config=tune.RunConfig(
            name=name, storage_path=str(Path(t.storage_path).absolute()), callbacks=callbacks, verbose=0,
            checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False)))  # a trial has nothing to save
    with ctrl_c_interrupts(), contextlib.closing(bar):
        results = tuner.fit()
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"{category}: {len(errors)} tuning trial(s) failed, first: {errors[0]!r}")
    finished = sum(all(m in (r.metrics or {}) for m in ([metric] if isinstance(metric, str) else metric))
                   for r in results)
    if finished < trials:  # Tune stops early only when told to (SIGUSR1): choose nothing from a partial search
        raise KeyboardInterrupt(f"{category}: Ray Tune stopped the search {name!r} after {finished} of {trials} "
                                f"trials; nothing was chosen from it")
    return results


def trial_progress(bar):
    """A Ray Tune callback that moves `bar` on by one for each trial that ends (a search of a large
    class's table runs for minutes; Tune itself is kept quiet, verbose=0)."""
    from ray.tune import Callback

    class TrialProgress(Callback):
        def __init__(self, bar):
            self.bar = bar

        def __getstate__(self) -> dict:
            return {"bar": None}  # Tune pickles its run config (tuner.pkl); a bar on a terminal is no part of it

        def on_trial_complete(self, iteration, trials, trial, **info):
            if self.bar is not None:
                self.bar.update(1)

        on_trial_error = on_trial_complete

    return TrialProgress(bar)


@contextlib.contextmanager
def ctrl_c_interrupts():
    """Ctrl-C raises KeyboardInterrupt inside the block, as everywhere else in reb.

    Ray Tune catches SIGINT to end its run gracefully and returns the trials that finished, so a
    Ctrl-C'd `reb tune` went on to choose from a partial search and wrote it as the result.
    """
    with environ_restored("TUNE_DISABLE_SIGINT_HANDLER"):
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # read by tune.run when it sets its handlers
        yield


def search_k_alpha(tables: ClassTables, t: TuneConfig, scoring: ScoringConfig, tracking: TrackingConfig,
                   backbone_name: str, mlflow_parent: str | None = None) -> Selection:
    """Ray Tune + OptunaSearch over the image score's K (integer) and alpha on one class's VALIDATION table.

    The objective is validation image AUROC; validation pixel AUROC only orders ties (see
    `validation_objective`).

    Args:
        tables: the class's tables (only `val`, its labels and masks are read).
        t: the search space, trial count, concurrency, seed and Tune storage.
        scoring: image score reduction and distance (squared or not).
        tracking: where trial runs are logged (nested under `mlflow_parent`, if given).
        backbone_name: names the Tune experiment, "tune-<category>-<backbone_name>".

    Returns:
        The best trial's (K, alpha) and validation metrics.
    """
    from ray import tune

    t0 = time.perf_counter()
    data = dict(table=tables.val, labels=tables.val_labels, masks=tables.val_masks, image_score=scoring.image_score,
                squared=scoring.squared)
    space = {"k": tune.randint(t.k_min, t.k_max + 1), "alpha": tune.uniform(t.alpha_min, t.alpha_max)}
    results = _search(image_trial, data, space, "objective", t.trials, t, f"tune-{tables.category}-{backbone_name}",
                      tables.category, tracking, mlflow_parent)
    best = results.get_best_result(metric="objective", mode="max")
    metrics = {k: float(v) for k, v in best.metrics.items() if k.startswith(("val_", "objective"))}
    return Selection(tables.category, int(best.config["k"]), float(best.config["alpha"]), metrics,
                     len(results), time.perf_counter() - t0)


def search_map(tables: ClassTables, t: TuneConfig, scoring: ScoringConfig, tracking: TrackingConfig,
               backbone_name: str, mlflow_parent: str | None = None) -> tuple[ScoringMethod, dict, int]:
    """Ray Tune + OptunaSearch over the anomaly map's method (ldknn | knn), K and alpha on one class's
    VALIDATION images and masks; objective: the mean of validation pixel AUROC and AUPRO.

    Returns:
        (the best setting, its validation metrics, the number of trials).
    """
    from ray import tune

    data = dict(table=tables.val, pixel_masks=tables.val_pixel_masks, keep=tables.val_has_mask, sigma=tables.sigma,
                squared=scoring.squared)
    space = {"method": tune.choice(["ldknn", "knn"]), "k": tune.randint(t.k_min, t.k_max + 1),
             "alpha": tune.uniform(0.0, t.map_alpha_max)}
    results = _search(map_trial, data, space, "map_objective", t.map_trials, t,
                      f"tune-map-{tables.category}-{backbone_name}", tables.category, tracking, mlflow_parent)
    best = results.get_best_result(metric="map_objective", mode="max")
    c = best.config
    setting = ScoringMethod(c["method"], int(c["k"]), float(c["alpha"]) if c["method"] == "ldknn" else 0.0)
    metrics = {k: float(v) for k, v in best.metrics.items() if k.startswith(("val_map", "map_objective"))}
    return setting, metrics, len(results)


def search_pareto(tables: ClassTables, t: TuneConfig, scoring: ScoringConfig, tracking: TrackingConfig,
                  backbone_name: str,
                  mlflow_parent: str | None = None) -> tuple[list[dict], list[dict], dict | None, dict]:
    """Ray Tune + OptunaSearch (multi-objective) over one COUPLED LDKNN (K, alpha), the image score's
    and the map's, on one class's VALIDATION images and masks: validation image AUROC and the map
    objective (mean of pixel AUROC and AUPRO), both maximised; tune.trials trials, K in
    k_min..k_max, alpha in alpha_min..alpha_max.

    Returns:
        (every trial's K, alpha and validation metrics, their `pareto_front`, its `pareto_choice`
        against the reference, the reference: the default scoring.k / scoring.alpha on the same images).
    """
    from ray import tune

    data = dict(table=tables.val, labels=tables.val_labels, masks=tables.val_masks, pixel_masks=tables.val_pixel_masks,
                keep=tables.val_has_mask, image_score=scoring.image_score, sigma=tables.sigma, squared=scoring.squared)
    space = {"k": tune.randint(t.k_min, t.k_max + 1), "alpha": tune.uniform(t.alpha_min, t.alpha_max)}
    results = _search(pareto_trial, data, space, list(PARETO_METRICS), t.trials, t,
                      f"tune-pareto-{tables.category}-{backbone_name}", tables.category, tracking, mlflow_parent)
    # get_best_result takes one metric: every trial's pair is read from the grid instead
    kept = ("val_", "objective", "map_objective")
    trials = [{"k": int(r.config["k"]), "alpha": float(r.config["alpha"]),
               **{k: float(v) for k, v in r.metrics.items() if k.startswith(kept)}} for r in results]
    front = pareto_front(trials)
    reference = coupled_validation(tables, scoring.k, scoring.alpha, scoring)
    return trials, front, pareto_choice(front, reference), reference
