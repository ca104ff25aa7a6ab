"""reb-dist: REB (DefectMaker + LDKNN) anomaly detection, benchmarking and tuning on Ray.

The Python API (reb_dist.api): a model from a file or fitted, images scored, a test set evaluated::

    import reb_dist

    model = reb_dist.load("models/bottle.safetensors")    # or reb_dist.Model.fit("sample", calibrate=True)
    result = model.predict(["new_images/", pil_image])      # .scores .normalised_scores .flags .maps
    metrics = model.evaluate("/data/mvtec_ad")             # the model's category's test set

What each command does, with the same settings object::

    cfg = reb_dist.RunConfig.load("jobs/sample_benchmark.yaml", ["scoring.k=5"])
    results = reb_dist.benchmark(cfg)                      # every method x category, as `reb benchmark`
    paths = reb_dist.fit(cfg, "models/")                   # one model file per category, as `reb fit`
    detector = reb_dist.load_model(paths["bottle"])
    predictions = reb_dist.predict(detector, reb_dist.find_images(["new_images/"]))

Names are imported on first use, so `import reb_dist` stays light (no torch until needed).
"""

from __future__ import annotations

import importlib

from reb_dist.version import __version__

# public name -> module that defines it
_EXPORTS = {
    "Model": "reb_dist.api", "Predictions": "reb_dist.api", "load": "reb_dist.api",
    "RunConfig": "reb_dist.config", "DataConfig": "reb_dist.config", "BackboneConfig": "reb_dist.config",
    "BankConfig": "reb_dist.config", "ScoringConfig": "reb_dist.config", "FinetuneConfig": "reb_dist.config",
    "TuneConfig": "reb_dist.config", "TrackingConfig": "reb_dist.config",
    "RebError": "reb_dist.errors",
    "Detector": "reb_dist.core.detector",
    "DefectMaker": "reb_dist.core.defectmaker",
    "ScoringMethod": "reb_dist.core.ldknn", "parse_method": "reb_dist.core.ldknn",
    "BankIndex": "reb_dist.core.ldknn", "Index": "reb_dist.core.ldknn",
    "save_model": "reb_dist.io.model_file", "load_model": "reb_dist.io.model_file",
    "load_category": "reb_dist.pipelines.evaluate", "fit_detector": "reb_dist.pipelines.evaluate",
    "evaluate_category": "reb_dist.pipelines.evaluate", "CategoryResult": "reb_dist.pipelines.evaluate",
    "find_images": "reb_dist.pipelines.predict", "predict": "reb_dist.pipelines.predict",
    "Prediction": "reb_dist.pipelines.predict",
    "fit": "reb_dist.commands.fit", "evaluate": "reb_dist.commands.evaluate",
    "benchmark": "reb_dist.commands.benchmark", "predict_images": "reb_dist.commands.predict",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'reb_dist' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
