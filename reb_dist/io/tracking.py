"""MLflow: the one module that imports it (besides Ray Tune's MLflow callback in
reb_dist.distributed.tuning).

A command opens one parent run (its settings as params); each (category, method) result is a
nested run tagged with category, method and backbone, so runs compare side by side in the MLflow UI
(e.g. filter `tags.method = 'ldknn(k=9,alpha=1)'`, group by `params.backbone.name`). Sweeps log
from their driver through `SweepLog`; `collect_results` reads everything back for `reb report`.

Which store: `resolve_uri`, MLflow's own precedence (an explicit URI, else MLFLOW_TRACKING_URI, else
the local default sqlite:///mlflow.db), used by every command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import sqlite3
import tempfile
import time
from pathlib import Path

import yaml

from reb_dist.config import RunConfig, TrackingConfig
from reb_dist.environ import environ_restored
from reb_dist.errors import ConfigError, RebError
from reb_dist.io.atomic import file_lock, host_id, pid_alive

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
log = logging.getLogger(__name__)
REPORT_METRICS = ("image_auroc", "pixel_auroc", "aupro")
# recall@K against exact of an approximate run's test-patch search and density self-search
REPORT_RECALLS = ("query_recall", "density_recall")
HOST_TAG, PID_TAG = "reb.host", "reb.pid"
DEFAULT_URI = "sqlite:///mlflow.db"  # the store when neither the settings nor the environment name one
URI_ENV = "MLFLOW_TRACKING_URI"


class TrackingStoreError(RebError):
    """An MLflow store cannot be used (half-migrated, older schema, unreadable); says how to recover."""


def resolve_uri(uri: str | None = None) -> str:
    """The tracking URI to use, as MLflow resolves it: `uri` when set (tracking.uri, --tracking-uri),
    else the MLFLOW_TRACKING_URI environment variable, else `DEFAULT_URI` (./mlflow.db).

    A sqlite file given relative to the current folder is made absolute (as MLflow does with its own
    default): MLflow caches its stores by URI, so a relative one would keep pointing at the folder
    where this process first opened it, whatever folder a later command runs in.
    """
    uri = uri or os.environ.get(URI_ENV) or DEFAULT_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/") and ":memory:" not in uri:
        return prefix + str(Path(uri[len(prefix):]).absolute())
    return uri


def use_store(uri: str, experiment_id: str) -> None:
    """mlflow.set_tracking_uri + set_experiment for this process's fluent API, without their side
    effect: MLflow also writes MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_ID into the environment, so
    every later command of the same process (a script's second `Model.fit`, a sweep, a `ray job submit`
    it starts) would take this store for the user's choice, and `resolve_uri` would no longer fall
    back to the default."""
    import mlflow

    with environ_restored(URI_ENV, "MLFLOW_EXPERIMENT_ID"):
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment_id=experiment_id)


def process_tags() -> dict[str, str]:
    """The tags naming the process that writes a run: what tells later whether it still runs."""
    return {HOST_TAG: host_id(), PID_TAG: str(os.getpid())}


def sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///` store URI (relative to the working folder as MLflow reads it);
    None for any other store or an in-memory one."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?")[0]
    return Path(path) if path and path != ":memory:" else None


def open_store(uri: str, experiment: str | None = None):
    """An MLflow client on `uri`, its store created or migrated by one process at a time.

    Two processes creating a new sqlite store at once both ran its schema migrations and left it
    half-migrated, so every later run failed. A sqlite store is therefore opened under a lock file
    `<db>.lock` beside it: the first process creates it, the others wait and then open it.

    Args:
        uri: the MLflow tracking URI.
        experiment: an experiment name to create if missing (under the same lock).

    Returns:
        (client, the experiment's id or None).

    Raises:
        TrackingStoreError: the store is half-migrated, of an older schema or cannot be opened;
            the message names it and says how to recover.
    """
    import mlflow

    db = sqlite_path(uri)
    if db is not None:
        _check_folder(uri, db)
    _check_reachable(uri)
    with file_lock(db.with_name(db.name + ".lock")) if db else contextlib.nullcontext():
        if db is not None:
            _check_no_interrupted_migration(db)
        try:
            client = mlflow.MlflowClient(uri)
            client.search_experiments(max_results=1)  # creates / migrates the store now, under the lock
            experiment_id = None
            if experiment:
                exp = client.get_experiment_by_name(experiment)
                experiment_id = exp.experiment_id if exp else client.create_experiment(
                    experiment, artifact_location=artifact_location(db, experiment))
        except Exception as exc:
            raise _store_error(uri, db, exc) from exc
    return client, experiment_id


def artifact_location(db: Path | None, experiment: str) -> str | None:
    """Where a new experiment of a sqlite store keeps its artefacts: `mlartifacts/<experiment>` beside
    the database, so store and artefacts stay together. (MLflow's own default is ./mlruns of whatever
    folder the process runs in, so a sweep submitted from elsewhere scattered its artefacts.) None for
    other stores: a tracking server decides for itself."""
    if db is None:
        return None
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment).strip(".") or "experiment"
    return (db.absolute().parent / "mlartifacts" / safe).as_uri()


REACH_TIMEOUT = 5.0  # seconds to connect to an HTTP tracking server before saying it cannot be reached


def _check_folder(uri: str, db: Path) -> None:
    """A sqlite store's folder exists (made when missing) and is writable: sqlite and the store's
    lock file need both, and said FileNotFoundError on the lock instead."""
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrackingStoreError(f"{uri}: cannot create the store's folder {db.parent} ({exc.strerror or exc})") from exc
    if not os.access(db.parent, os.W_OK | os.X_OK):
        raise TrackingStoreError(f"{uri}: the store's folder {db.parent} is not writable; choose another "
                                 "tracking.uri, or --no-mlflow")


def _check_reachable(uri: str) -> None:
    """An http(s) tracking server answers a TCP connection within `REACH_TIMEOUT` seconds; MLflow
    itself retries for minutes in silence (4 min 21 s measured) before failing."""
    import socket
    from urllib.parse import urlparse

    parts = urlparse(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=REACH_TIMEOUT).close()
    except OSError as exc:
        raise TrackingStoreError(f"{uri}: the MLflow server cannot be reached ({exc.strerror or exc}); start it, "
                                 "set another tracking.uri, or --no-mlflow") from exc


def _check_no_interrupted_migration(db: Path) -> None:
    """Refuse a store whose schema migration was interrupted: alembic's `_alembic_tmp_*` tables are
    left only then (under the lock nobody else migrates it now)."""
    if not db.is_file() or db.stat().st_size == 0:
        return
    try:
        with contextlib.closing(sqlite3.connect(db.resolve().as_uri() + "?mode=ro", uri=True)) as con:
            left = [row[0] for row in con.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name GLOB '_alembic_tmp_*'")]
    except sqlite3.DatabaseError as exc:
        raise TrackingStoreError(f"{db}: not a readable SQLite MLflow store ({exc}). Move it aside "
                                 f"(mv {db} {db}.broken) to start a new one, or run with --no-mlflow") from exc
    if left:
        raise TrackingStoreError(
            f"{db}: the MLflow store is half-migrated (table {', '.join(left)} left by an interrupted schema "
            f"migration, e.g. two runs creating it at once), so no run can use it. To recover, move it aside "
            f"(mv {db} {db}.broken) and rerun to start a new store; or, to keep its runs, back it up, drop "
            f"the leftover table(s) (sqlite3 {db} '{'; '.join(f'DROP TABLE {t}' for t in left)}') and run "
            f"`mlflow db upgrade sqlite:///{db}`")


def _store_error(uri: str, db: Path | None, exc: Exception) -> TrackingStoreError:
    cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if "out-of-date database schema" in cause:  # MLflow's own check: a store of an older MLflow
        return TrackingStoreError(
            f"{db or uri}: the MLflow store has an older schema than this MLflow ({cause}). Back it up, then run "
            f"`mlflow db upgrade {uri}`; or move it aside{f' (mv {db} {db}.broken)' if db else ''} to start a new one")
    return TrackingStoreError(
        f"{db or uri}: cannot open the MLflow store: {cause}. If it is damaged, move it aside"
        f"{f' (mv {db} {db}.broken)' if db else ''} to start a new one; or run with --no-mlflow")


def fail_dead_runs(client, experiment_ids: list[str] | None = None) -> list[str]:
    """Mark FAILED the RUNNING runs of this host whose process is gone (killed: it could not end
    them), saying so in one line on stderr.

    Runs of other hosts are left alone: whether their process runs cannot be told from here.

    Returns:
        The ids of the runs marked.
    """
    ids = [e.experiment_id for e in client.search_experiments()] if experiment_ids is None else experiment_ids
    if not ids:
        return []
    host = host_id().replace("'", "")
    running = client.search_runs(ids, f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
                                 max_results=50000)
    dead = [r for r in running
            if r.data.tags.get(PID_TAG, "").isdigit() and not pid_alive(int(r.data.tags[PID_TAG]))]
    for run in dead:
        client.set_terminated(run.info.run_id, "FAILED")
    if dead:
        names = ", ".join(f"{r.info.run_name} (pid {r.data.tags[PID_TAG]})" for r in dead[:5])
        log.warning(f"mlflow: marked {len(dead)} run(s) FAILED, left RUNNING by a process that is gone "
                    f"(killed?): {names}{', ...' if len(dead) > 5 else ''}")
    return [r.info.run_id for r in dead]


def fail_running_children(client, parent) -> list[str]:
    """Mark FAILED the RUNNING runs nested under `parent` (a RunInfo): runs that others opened under
    it, such as Ray Tune's trial runs, stay RUNNING when the block that owns them is cut off.

    Returns:
        The ids of the runs marked.
    """
    running = client.search_runs([parent.experiment_id], f"attributes.status = 'RUNNING' and "
                                 f"tags.`mlflow.parentRunId` = '{parent.run_id}'", max_results=50000)
    for run in running:
        client.set_terminated(run.info.run_id, "FAILED")
    return [r.info.run_id for r in running]


class Tracker:
    """A command's MLflow runs; every method is a no-op when tracking is disabled, so callers never
    branch on it.

    Args:
        cfg: the tracking settings (store URI, experiment, run name, on/off).
    """

    def __init__(self, cfg: TrackingConfig):
        self.cfg = cfg
        self.enabled = cfg.enabled
        self.uri = resolve_uri(cfg.uri)
        self.run_id: str | None = None
        self.settings: dict = {}  # the parent run's resolved settings, as params
        self.setting_tags: dict[str, str] = {}

    @contextlib.contextmanager
    def run(self, config: RunConfig, command: str, run_name: str | None = None):
        """The command's parent run, open for the block: settings as params, config.yaml as artefact.

        Opening it first marks FAILED the runs of killed processes of this host (`fail_dead_runs`).
        The run is named `run_name`, else tracking.run_name, else "<command>-<backbone>". Its params
        show the store actually used as tracking.uri (`resolve_uri`).
        """
        if not self.enabled:
            yield self
            return
        import mlflow

        client, experiment_id = open_store(self.uri, self.cfg.experiment)
        fail_dead_runs(client)
        use_store(self.uri, experiment_id)
        name = run_name or self.cfg.run_name or f"{command}-{config.backbone.name}"
        # the params say which store was used, however it was chosen
        config = dataclasses.replace(config, tracking=dataclasses.replace(config.tracking, uri=self.uri))
        with mlflow.start_run(run_name=name, tags=process_tags()) as active:
            self.run_id = active.info.run_id
            # children get these too: a result run is filtered and compared by its own settings in the UI
            self.settings = config.flat()
            self.setting_tags = {"backbone": config.backbone.name, "preset": config.preset}
            mlflow.set_tags({"command": command, **self.setting_tags})
            log_params_batched(self.settings)
            mlflow.log_text(yaml.safe_dump(config.to_dict(), sort_keys=False), "config.yaml")
            yield self

    def log_result(self, category: str, method_label: str, metrics: dict[str, float],
                   extra_params: dict | None = None, mode: str | None = None) -> None:
        """A nested run per (category, method): metric names stay the same across runs.

        `mode`, the search mode the figures were computed in (Detector.search_mode), is a tag and a
        param, so `reb report` keeps rows of different modes apart and the UI can filter on it. The run
        also carries every resolved setting of the command as params, and its backbone and preset as
        tags, as sweep cells do (`SweepLog.log_cell`).
        """
        if not self.enabled:
            return
        import mlflow

        with mlflow.start_run(run_name=f"{category}/{method_label}", nested=True, tags=process_tags()):
            mlflow.set_tags({**self.setting_tags, "category": category, "method": method_label,
                             **({"mode": mode} if mode else {})})
            log_params_batched({**self.settings, **(extra_params or {}), **({"mode": mode} if mode else {})})
            mlflow.log_metrics({metric_name(k): float(v) for k, v in metrics.items()})

    @contextlib.contextmanager
    def child(self, name: str, tags: dict[str, str]):
        """A nested run open for the block; yields its id (None when tracking is off)."""
        if not self.enabled:
            yield None
            return
        import mlflow

        with mlflow.start_run(run_name=name, nested=True, tags=process_tags()) as active:
            mlflow.set_tags(tags)
            try:
                yield active.info.run_id
            except BaseException:
                try:
                    fail_running_children(mlflow.MlflowClient(), active.info)
                except Exception as exc:  # the store may be what failed: the first error is the one to see
                    log.warning(f"mlflow: could not close the runs under {name}: {exc!r}")
                raise

    def log_model(self, model_file, category: str, sha256: str | None = None) -> str | None:
        """A model file as a pyfunc MLflow model in the active run, named after its category, and
        registered under tracking.register_model ("{category}" filled in) when that is set; with
        `sha256`, only the very bytes of that hash (see `reb_dist.io.mlflow_model.log_model`).

        Returns:
            The logged model's URI for `mlflow.pyfunc.load_model`; None when tracking is off.
        """
        if not self.enabled:
            return None
        from reb_dist.io.mlflow_model import log_model

        try:
            registered = self.cfg.register_model.format(category=category) if self.cfg.register_model else None
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"tracking.register_model={self.cfg.register_model!r}: only {{category}} can be "
                              f"filled in ({exc!r})") from exc
        return log_model(model_file, category, registered, sha256).model_uri

    def log_params(self, params: dict) -> None:
        """Params of the active run, values as text."""
        if self.enabled:
            import mlflow

            mlflow.log_params({k: str(v) for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Metrics of the active run (names made MLflow-safe), at `step` if given."""
        if self.enabled:
            import mlflow

            mlflow.log_metrics({metric_name(k): float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path, folder: str | None = None) -> None:
        """A file as an artefact of the active run, under `folder` if given."""
        if self.enabled:
            import mlflow

            mlflow.log_artifact(str(path), folder)

    def log_text(self, text: str, name: str) -> None:
        """Text as an artefact file `name` of the active run."""
        if self.enabled:
            import mlflow

            mlflow.log_text(text, name)

    def log_table(self, rows: list[dict], name: str) -> None:
        """Rows of a table as an MLflow table artefact `name` (.json)."""
        if self.enabled and rows:
            import mlflow

            mlflow.log_table({k: [r.get(k) for r in rows] for k in rows[0]}, name)


def metric_name(key: str) -> str:
    """A metric name MLflow accepts. MLflow metric names allow alphanumerics and `_ - . : /` and spaces; anything else becomes '_'."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", key)


PARAMS_PER_BATCH = 100  # MLflow's limit of params in one log_batch call


def log_params_batched(params: dict) -> None:
    """Params of the active run, values as text, in batches MLflow accepts."""
    import mlflow

    items = [(k, str(v)) for k, v in params.items()]
    for start in range(0, len(items), PARAMS_PER_BATCH):
        mlflow.log_params(dict(items[start:start + PARAMS_PER_BATCH]))


class SweepLog:
    """A sweep submission's MLflow runs, written from the driver only (parallel writers race on a
    sqlite store): one parent run, one FINISHED nested run per (cell, method), logged in one batch.

    Opening closes, as FAILED, runs of the same sweep that a killed submission left RUNNING.

    Args:
        uri: the MLflow tracking URI.
        experiment: the experiment name (created if missing).
        sweep: the sweep's name (tag `sweep`).
        spec: the sweep's settings, logged as sweep.yaml.
        output: the sweep's output folder (tag `output`).
    """

    def __init__(self, uri: str, experiment: str, sweep: str, spec: dict, output: str):
        self.client, self.experiment_id = open_store(uri, experiment)
        self.sweep = sweep
        stale = self.client.search_runs([self.experiment_id],
                                        f"tags.sweep = '{sweep}' and attributes.status = 'RUNNING'")
        for run in stale:
            self.client.set_terminated(run.info.run_id, "FAILED")
        run = self.client.create_run(self.experiment_id, run_name=f"sweep-{sweep}",
                                     tags={"sweep": sweep, "kind": "sweep", "output": output, **process_tags()})
        self.run_id = run.info.run_id
        self.client.log_text(self.run_id, yaml.safe_dump(spec), "sweep.yaml")

    def log_cell(self, cell_id: str, tags: dict[str, str], params: dict[str, str],
                 methods: dict[str, dict[str, float]]) -> None:
        """One FINISHED nested run per method of a cell, tagged `tags` + cell + method, with `params`.

        Idempotent: a method this sweep already logged FINISHED for this cell (by an earlier submission
        stopped before the cell's file was written, which therefore reruns the cell) is not logged again.
        """
        from mlflow.entities import Metric, Param

        logged = {r.data.tags.get("method") for r in self.client.search_runs(
            [self.experiment_id], f"tags.sweep = '{self.sweep}' and tags.kind = 'cell' and tags.cell = '{cell_id}' "
            "and attributes.status = 'FINISHED'")}
        now = int(time.time() * 1000)
        for method, metrics in methods.items():
            if method in logged:
                continue
            run = self.client.create_run(self.experiment_id, run_name=f"{cell_id}/{method}", tags={
                "mlflow.parentRunId": self.run_id, "sweep": self.sweep, "kind": "cell", **tags, "cell": cell_id,
                "method": method})
            items = [Param(k, str(v)) for k, v in {**params, "method": method}.items()]
            self.client.log_batch(run.info.run_id,
                                  metrics=[Metric(metric_name(k), float(v), now, 0) for k, v in metrics.items()],
                                  params=items[:PARAMS_PER_BATCH])
            for start in range(PARAMS_PER_BATCH, len(items), PARAMS_PER_BATCH):
                self.client.log_batch(run.info.run_id, params=items[start:start + PARAMS_PER_BATCH])
            self.client.set_terminated(run.info.run_id, "FINISHED")

    def close(self, status: str) -> None:
        """End the parent run as FINISHED or FAILED."""
        self.client.set_terminated(self.run_id, status)


def collect_results(uri: str | None, experiments: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """Every FINISHED result and tune-trial run of an MLflow store, for `reb report`.

    Runs of this host left RUNNING by a killed process are first marked FAILED (`fail_dead_runs`).
    Result runs (tagged `category` and `method`) become one row each, keyed by (category, backbone,
    weights, method, search mode), the newest run winning: a coreset-densities run never replaces the
    exact row of the same class, its figures being of another quantity (`run_mode`). Tune trial runs
    (tag kind=trial) become trial rows. A tune class run with a Pareto search (param
    selected.pareto_k) adds, the newest per class, one trial row {"category", "pareto"}: its
    pareto_<category>.json (trials, front, choice, reference).

    Args:
        uri: the MLflow tracking URI (None: `resolve_uri`'s choice).
        experiments: only these experiment names (default: all).

    Returns:
        (result rows, trial rows), as plain dicts; a result row has its mode, its REPORT_METRICS and,
        for an approximate run, its REPORT_RECALLS.
    """
    client, _ = open_store(resolve_uri(uri))
    exps = [e for e in client.search_experiments() if not experiments or e.name in experiments]
    fail_dead_runs(client, [e.experiment_id for e in exps])
    results: dict[tuple, dict] = {}
    trials = []
    pareto: dict[str, dict] = {}
    parents: dict[str, object] = {}  # parent run id -> its data, each read once
    for run in client.search_runs([e.experiment_id for e in exps], "attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time ASC"], max_results=50000):
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        if tags.get("kind") == "trial" and "k" in params:
            trials.append({"category": tags.get("category", "?"), "k": int(params["k"]),
                           "alpha": float(params["alpha"]),
                           **{k: v for k, v in metrics.items() if k.startswith("val_") or k == "objective"}})
        elif tags.get("kind") == "class" and "selected.pareto_k" in params:
            pareto[tags["category"]] = {"category": tags["category"],
                                        "pareto": _run_json(client, run.info.run_id, f"pareto_{tags['category']}.json")}
        elif "category" in tags and "method" in tags and "image_auroc" in metrics:
            parent = lambda: _parent(client, tags, parents)
            backbone = tags.get("backbone") or params.get("backbone.name") or _parent_backbone(parent())
            weights = params.get("weights", "imagenet")
            # a sweep's datasets can share category names (e.g. a full and a few-shot bank)
            category = f"{tags['dataset']}/{tags['category']}" if tags.get("dataset") else tags["category"]
            key = (category, backbone, weights, tags["method"], run_mode(tags, params, parent))
            results[key] = {"category": key[0], "backbone": key[1], "weights": key[2], "method": key[3],
                            "mode": key[4], **{m: metrics[m] for m in REPORT_METRICS + REPORT_RECALLS if m in metrics},
                            "run_id": run.info.run_id}
    rows = sorted(results.values(), key=lambda r: (r["category"], r["backbone"], r["weights"], r["method"], r["mode"]))
    return rows, trials + [pareto[c] for c in sorted(pareto)]


def run_mode(tags: dict, params: dict, parent=lambda: None) -> str:
    """The search mode of a result run: its `mode` tag, or for a run logged before results carried
    one, `legacy_mode` of its own params over its parent's (`parent()`: the parent run's data or None).

    What those older runs logged: a benchmark or tune result run only its k, alpha and weights (tune:
    variant, map_method), while its parent run had the settings (`config.flat()`: preset, bank.*) and
    a `preset` tag; a sweep cell run had `preset` among its own params and a parent without settings.
    """
    if tags.get("mode"):
        return tags["mode"]
    data = parent()
    return legacy_mode({**(data.params if data else {}), **params})


def legacy_mode(params: dict[str, str]) -> str:
    """The search mode of settings logged before runs carried one (params as MLflow holds them).

    The old presets were "exact" (the default: it changed no setting) and "fast" (a 0.1 coreset,
    IVF); a run with no preset at all predates presets and was exact. A coreset bank computes
    coreset densities whatever the preset; an IVF or HNSW search set explicitly was re-ranked exactly
    (faithful). "auto" searches count as exact: they stayed exact up to 1M bank points then, more
    than an MVTec AD class's bank at the default image size.
    """
    preset = params.get("preset", "exact")
    if preset in ("fast", "coreset-densities") or float(params.get("bank.coreset_ratio", 1.0)) < 1.0:
        return "coreset-densities"
    searches = {params.get("bank.query_search", "exact"), params.get("bank.neighbour_search", "exact")}
    return "faithful" if preset == "faithful" or searches & {"ivf", "hnsw"} else "exact"


def _run_json(client, run_id: str, name: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, name, tmp)).read_text())


def _parent_backbone(data) -> str:
    return (data.tags.get("backbone") or data.params.get("backbone.name", "?")) if data else "?"


def _parent(client, tags: dict, cache: dict):
    """The data (tags, params) of a run's parent run, read once per parent; None for a run without one."""
    parent = tags.get("mlflow.parentRunId")
    if not parent:
        return None
    if parent not in cache:
        cache[parent] = client.get_run(parent).data
    return cache[parent]
