"""MLflow: the one place that knows run names, params, metrics and artefacts.

A command opens one parent run (its settings as params); each (category, method) result is a
nested run tagged with category, method and backbone, so runs compare side by side in the MLflow UI
(e.g. filter `tags.method = 'ldknn(k=9,alpha=1)'`, group by `params.backbone.name`).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

from reb_dist.config import RunConfig, TrackingConfig

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


class Tracker:
    """No-op when tracking is disabled, so callers never branch on it."""

    def __init__(self, cfg: TrackingConfig):
        self.cfg = cfg
        self.enabled = cfg.enabled
        self.run_id: str | None = None

    @contextlib.contextmanager
    def run(self, config: RunConfig, command: str):
        if not self.enabled:
            yield self
            return
        import mlflow

        mlflow.set_tracking_uri(self.cfg.uri)
        mlflow.set_experiment(self.cfg.experiment)
        name = self.cfg.run_name or f"{command}-{config.backbone.name}"
        with mlflow.start_run(run_name=name) as active:
            self.run_id = active.info.run_id
            mlflow.set_tags({"command": command, "backbone": config.backbone.name})
            mlflow.log_params(config.flat())
            mlflow.log_text(_yaml(config), "config.yaml")
            yield self

    def log_result(self, category: str, method_label: str, metrics: dict[str, float],
                   extra_params: dict | None = None) -> None:
        """A nested run per (category, method): metric names stay the same across runs."""
        if not self.enabled:
            return
        import mlflow

        with mlflow.start_run(run_name=f"{category}/{method_label}", nested=True):
            mlflow.set_tags({"category": category, "method": method_label})
            if extra_params:
                mlflow.log_params({k: str(v) for k, v in extra_params.items()})
            mlflow.log_metrics({_metric_name(k): float(v) for k, v in metrics.items()})

    @contextlib.contextmanager
    def child(self, name: str, tags: dict[str, str]):
        """A nested run open for the block; yields its id (None when tracking is off)."""
        if not self.enabled:
            yield None
            return
        import mlflow

        with mlflow.start_run(run_name=name, nested=True) as active:
            mlflow.set_tags(tags)
            yield active.info.run_id

    def log_params(self, params: dict) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_params({k: str(v) for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_metrics({_metric_name(k): float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_artifact(str(path), folder)

    def log_text(self, text: str, name: str) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_text(text, name)

    def log_table(self, rows: list[dict], name: str) -> None:
        if self.enabled and rows:
            import mlflow

            mlflow.log_table({k: [r.get(k) for r in rows] for k in rows[0]}, name)


def _metric_name(key: str) -> str:
    """MLflow metric names allow alphanumerics and `_ - . : /` and spaces; anything else becomes '_'."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", key)


def _yaml(config: RunConfig) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        config.dump(path)
        return path.read_text()
