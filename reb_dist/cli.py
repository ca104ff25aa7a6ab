"""`reb`: fit, evaluate, benchmark and predict from the command line.

Every subcommand that runs with settings takes `--config FILE` (YAML/JSON) and any number of
`--set section.key=value` overrides; the resolved settings are saved beside the outputs and logged
to MLflow, and `--print-config` prints them (YAML, loadable with --config) without running.
Progress goes to stderr (`-q`: warnings only, `-v`: debug too); results go to stdout.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

from reb_dist.config import PRESET_ALIASES, PRESETS, RunConfig
from reb_dist.errors import DatasetError, RebError, Terminated
from reb_dist.progress import show_progress

log = logging.getLogger("reb_dist.cli")  # not __name__: run as `python -m reb_dist.cli` that is __main__


def _add_verbosity(p: argparse.ArgumentParser, default=argparse.SUPPRESS) -> None:
    """-q / -v, accepted before the subcommand and on it (the subcommand's own flag wins)."""
    p.add_argument("--quiet", "-q", dest="verbosity", action="store_const", const=-1, default=default,
                   help="warnings and errors only")
    p.add_argument("--verbose", "-v", dest="verbosity", action="store_const", const=1, default=default,
                   help="debug messages too")


def _add_settings(p: argparse.ArgumentParser) -> None:
    """--config, --set and --print-config: what every subcommand that runs with settings takes."""
    p.add_argument("--config", "-c", help="YAML/JSON settings file")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set scoring.k=5 (repeatable)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved settings (YAML, loadable with --config) and exit without running")


def _add_common(p: argparse.ArgumentParser) -> None:
    _add_settings(p)
    p.add_argument("--root", help="dataset root (shortcut for --set data.root=...)")
    p.add_argument("--categories", help="comma-separated categories (data.categories)")
    p.add_argument("--methods", help="comma-separated scoring methods (scoring.methods), "
                                     "e.g. ldknn,knn,nn1 or ldknn:k=5,alpha=0.5")
    p.add_argument("--backbone", help="backbone name (backbone.name)")
    p.add_argument("--preset", choices=sorted(PRESETS) + sorted(PRESET_ALIASES),
                   help="named defaults under the other settings: auto (default: exact up to 100k bank "
                        "points, faithful above), exact, faithful (the whole bank, IVF re-ranked exactly, "
                        "recall measured) or coreset-densities (a 10%% coreset; densities among coreset "
                        "points; 'fast' is its old name); see docs/RESULTS.md section 11")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")


def build_parser() -> argparse.ArgumentParser:
    """The `reb` argument parser: one subcommand per command, common settings flags on each."""
    parser = argparse.ArgumentParser(prog="reb", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"reb-dist {package_version()}")
    _add_verbosity(parser, default=0)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="build and save a memory bank (with densities) per category")
    _add_common(p)
    p.add_argument("--output", "-o", help="model file (one category) or folder (default: "
                                          "<output_dir>/models/<category>.safetensors)")
    p.add_argument("--selection", help="a selection.json written by `reb tune`: each category's image and map "
                                       "settings and image threshold, its bank from the same images")
    p.add_argument("--images", nargs="+", metavar="IMAGE_OR_FOLDER",
                   help="fit one model from these good images (files or folders) instead of a dataset's "
                        "categories: no test set needed; named by --categories, else the first folder")
    p.add_argument("--calibrate", action="store_true",
                   help="hold out tune.fraction of the training images (normal + DefectMaker anomaly each) and "
                        "save an image threshold (tune.threshold: f1 | quantile) taken on their scores")

    p = sub.add_parser("evaluate", help="score a category's test set with a saved model")
    _add_common(p)
    p.add_argument("--model", "-m", required=True, help="a .safetensors model written by `reb fit`")

    p = sub.add_parser("benchmark", help="several methods x categories in one run, printing a table")
    _add_common(p)

    p = sub.add_parser("finetune", help="REB's DefectMaker self-supervised fine-tuning on Ray "
                                        "(Ray Data stream -> Ray Train), one backbone file per category")
    _add_common(p)
    p.add_argument("--output", "-o", help="backbone file (one category) or folder (default: "
                                          "<output_dir>/backbones/<category>-<task>.safetensors)")

    p = sub.add_parser("tune", help="per-class LDKNN K and alpha on a validation split (Ray Tune + Optuna), "
                                    "then test metrics of per-class vs global vs default settings")
    _add_common(p)

    p = sub.add_parser("report", help="compare backbones and methods across everything an MLflow store holds "
                                      "(table, AUROC per class per backbone, K/alpha surface per class)")
    p.add_argument("--tracking-uri", default=None,
                   help="the MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--experiment", action="append", help="only these experiments (repeatable; default: all)")
    p.add_argument("--output", "-o", default="outputs/report",
                   help="folder for report.md / .csv and the plots (default: outputs/report)")

    p = sub.add_parser("predict", help="score images with a saved model, write heatmap overlays")
    p.add_argument("--model", "-m", required=True,
                   help="a .safetensors model from `reb fit`, or a .onnx / .pt file from `reb export`")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--output", "-o", default="predictions", help="folder for overlays and scores.csv")
    p.add_argument("--threshold", type=float,
                   help="flag images whose score is at least this (default: the model's saved, calibrated "
                        "threshold; no flags if it has none)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the model's device where "
                                                   "available, else cpu)")

    p = sub.add_parser("export", help="write a saved model as one ONNX or TorchScript file (backbone, bank, "
                                      "search, scores, maps, threshold) that scores images without reb-dist's "
                                      "backbone weights, faiss or Ray; `reb predict -m` takes it too")
    p.add_argument("--model", "-m", required=True, help="a .safetensors model written by `reb fit`")
    p.add_argument("--format", "-f", required=True, choices=["onnx", "torchscript"],
                   help="onnx (scored with onnxruntime alone) or torchscript (torch alone)")
    p.add_argument("--output", "-o", help="the exported file (default: the model's path with .onnx or .pt); "
                                          "its metadata goes beside it as <file>.json")
    p.add_argument("--dynamo", action="store_true", help="onnx: torch's dynamo exporter (slower to export)")
    p.add_argument("--force", action="store_true", help="replace an existing output file (never the model itself)")

    p = sub.add_parser("cache", help="the patch feature cache: where it is and how big (info), or empty it (clear)")
    p.add_argument("action", choices=["info", "clear"], help="info: folder, files and size; clear: delete its files")
    _add_settings(p)  # its cache section names the folder, e.g. --set cache.dir=/scratch/features

    p = sub.add_parser("configs", help="the example settings and sweep files shipped in the package: list them, "
                                       "or print one to copy and edit")
    p.add_argument("name", nargs="?", help="print this one (e.g. sample_sweep); without it: list them all")

    p = sub.add_parser("sweep", help="datasets x categories x backbones x methods as Ray tasks on the cluster "
                                     "(RAY_ADDRESS) or a local Ray; resumable: finished cells are skipped")
    p.add_argument("--config", "-c", "--sweep", dest="sweep", required=True,
                   help="sweep YAML (see jobs/sample_sweep.yaml)")
    p.add_argument("--out", "-o", help="folder for cell results, summary.md/.csv and (by default) MLflow "
                                       "(default: outputs/sweeps/<sweep name>)")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else "
                                          "sqlite:///<out>/mlflow.db)")
    p.add_argument("--experiment", default="reb-dist-sweeps",
                   help="MLflow experiment of the sweep's runs (default: reb-dist-sweeps)")

    for name, p in sub.choices.items():
        _add_verbosity(p)
        p.description = DESCRIPTIONS.get(name) or subcommand_help(sub, name)
        p.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def subcommand_help(sub, name: str) -> str:
    """The one-line help a subcommand was added with (what `reb --help` lists)."""
    return next(a.help for a in sub._choices_actions if a.dest == name)


# what `reb <command> --help` says beyond its one line: what it reads, writes and how to steer it
DESCRIPTIONS = {
    "tune": """per-class LDKNN K and alpha on a validation split (Ray Tune + Optuna), then test metrics of
per-class vs global vs default settings.

Per class: the bank and one neighbour search are computed once; tune.trials Optuna trials choose the
image score's (K, alpha) on validation image AUROC, tune.map_trials choose the map's method apart
(0: coupled, as the paper); tune.k_max bounds K, tune.alpha_max alpha; tune.validation is synthetic
(held-out normal training images + DefectMaker anomalies, the default) or test (a seeded part of the
test set, reported metrics on the rest only).

Writes <output_dir>/tune/: selection.json / .csv (each class's image setting, map setting and
threshold: `reb fit --selection` takes it), results.md / .json (default, global, per-class rows with
image AUROC, pixel AUROC, AUPRO and F1), splits.json, config.yaml (and pareto_<class>.png with
tune.multi_objective); logs a parent MLflow run with one child run per trial (`reb report` plots
them). Example: reb tune --config tune/k_alpha.yaml --root /data/mvtec_ad""",
    "sweep": """datasets x categories x backbones x methods as Ray tasks on the cluster (RAY_ADDRESS) or a
local Ray; resumable: finished cells are skipped.

Writes <out>/cells/<cell>.json, summary.md / .csv and one MLflow run per submission with a nested run
per (cell, method). Example: reb sweep --config jobs/sample_sweep.yaml --out outputs/sweeps/sample""",
    "benchmark": """several methods x categories in one run, printing a table.

Writes <output_dir>/benchmark/: results.md / .json, ROC curves and heatmap galleries (this run's
also under runs/<time>-<id>/), and logs a parent MLflow run with a child per (category, method).
Example: reb benchmark --root /data/mvtec_ad --categories bottle,pill --methods ldknn,knn,nn1""",
    "configs": """the example settings and sweep files shipped in the package, so an installed reb-dist
needs no repository checkout: sample_benchmark (the README's main job), sample_sweep (a two-cell
sweep of the sample) and k_alpha (the tune search space). Any --config takes them by name; print one
to start your own. Example: reb configs sample_sweep > my_sweep.yaml""",
    "fit": """build and save a memory bank (with densities) per category.

Prints each model file's path; logs it to MLflow as a pyfunc model (registered with
tracking.register_model). Example: reb fit --root /data/mvtec_ad --categories pill -o pill.safetensors""",
}


def load_config(args: argparse.Namespace) -> RunConfig:
    """The run's settings: --config file, then --set overrides, then the shortcut flags."""
    overrides = list(args.overrides)
    for flag, key in (("root", "data.root"), ("categories", "data.categories"),
                      ("methods", "scoring.methods"), ("backbone", "backbone.name"), ("preset", "preset")):
        if getattr(args, flag, None):
            overrides.append(f"{key}={getattr(args, flag)}")
    if getattr(args, "no_mlflow", False):
        overrides.append("tracking.enabled=false")
    log.debug("settings: defaults <- %s <- %s", args.config or "no file", overrides or "no overrides")
    return RunConfig.load(args.config, overrides)


def package_version() -> str:
    """reb-dist's installed version (its metadata), else the source tree's `reb_dist.__version__`."""
    from importlib import metadata

    try:
        return metadata.version("reb-dist")
    except metadata.PackageNotFoundError:
        from reb_dist.version import __version__

        return __version__


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (so later redirections still apply)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _Formatter(logging.Formatter):
    """Info as the bare message (progress reads as it always did); other levels prefixed "warning: ",
    "error: ", "debug: <logger>: "."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno == logging.INFO:
            return message
        return f"{record.levelname.lower()}: " + (f"{record.name}: " if record.levelno < logging.INFO else "") + message


def configure_logging(verbosity: int = 0) -> None:
    """reb_dist's log records to stderr: -1 warnings and errors, 0 also info (progress), 1 also debug.
    `main` calls it on every call; it replaces the handler an earlier call installed."""
    logger = logging.getLogger("reb_dist")
    for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(_Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel({-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}[max(-1, min(1, verbosity))])
    show_progress(verbosity >= 0)  # -q: warnings and errors only, no bars either


def main(argv: list[str] | None = None) -> int:
    """Run `reb` with `argv` (default: sys.argv); 0 on success, 2 on a reb-dist error (logged), 130
    when interrupted (Ctrl-C: one line, no traceback), 143 when stopped by SIGTERM (`ray job stop`, `kill`)."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbosity)
    command_line = "reb " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    log.debug("reb-dist %s: %s", package_version(), command_line)
    from reb_dist.distributed.runtime import interrupt_on_sigterm, sigterm_count

    sigterms = sigterm_count()
    # `ray job stop`, `kill`: as Ctrl-C, exit 143 (a handler of the caller's own is left alone)
    own_sigterm = (signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
                   and threading.current_thread() is threading.main_thread())
    if own_sigterm:
        signal.signal(signal.SIGTERM, interrupt_on_sigterm)
    try:
        if getattr(args, "print_config", False):
            return print_config(args)
        return {"fit": cmd_fit, "evaluate": cmd_evaluate, "benchmark": cmd_benchmark,
                "finetune": cmd_finetune, "tune": cmd_tune, "report": cmd_report,
                "predict": cmd_predict, "cache": cmd_cache, "export": cmd_export,
                "sweep": cmd_sweep, "configs": cmd_configs}[args.command](args, command_line)
    except RebError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C: one line (the MLflow run is already ended FAILED), the shell's 130
        terminated = isinstance(exc, Terminated) or sigterm_count() > sigterms
        why = "SIGTERM" if terminated else str(exc)
        log.error("interrupted: %s stopped%s (its MLflow run is marked FAILED; files are written whole or not "
                  "at all)", command_line, f" ({why})" if why else "")
        return 143 if terminated else 130
    finally:
        if own_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def print_config(args: argparse.Namespace) -> int:
    """`--print-config`: the resolved settings as YAML on stdout, as `RunConfig.to_yaml` writes them."""
    sys.stdout.write(load_config(args).to_yaml())
    return 0


def cmd_fit(args, command_line: str) -> int:
    """`reb fit`: see reb_dist.commands.fit.fit."""
    from reb_dist.commands.fit import fit

    for path in fit(load_config(args), args.output, args.selection, args.calibrate, args.images).values():
        print(path)  # where each model went: a result, so on stdout (even with -q)
    return 0


def cmd_evaluate(args, command_line: str) -> int:
    """`reb evaluate`: see reb_dist.commands.evaluate.evaluate."""
    from reb_dist.commands.evaluate import evaluate

    evaluate(load_config(args), args.model, command_line)
    return 0


def cmd_benchmark(args, command_line: str) -> int:
    """`reb benchmark`: see reb_dist.commands.benchmark.benchmark."""
    from reb_dist.commands.benchmark import benchmark

    benchmark(load_config(args), command_line)
    return 0


def cmd_finetune(args, command_line: str) -> int:
    """`reb finetune`: see reb_dist.commands.finetune.finetune_categories."""
    from reb_dist.commands.finetune import finetune_categories
    from reb_dist.pipelines.evaluate import categories_of
    from reb_dist.commands.fit import output_files

    cfg = load_config(args)
    finetune_categories(cfg, output_files(args.output, categories_of(cfg.data), Path(cfg.output_dir) / "backbones",
                                          f"-{cfg.finetune.task}"))
    return 0


def cmd_tune(args, command_line: str) -> int:
    """`reb tune`: see reb_dist.commands.tune.run_tune."""
    from reb_dist.commands.tune import run_tune
    from reb_dist.pipelines.evaluate import categories_of

    log.info("# %s", command_line)
    cfg = load_config(args)
    run_tune(cfg, categories_of(cfg.data), command_line)
    return 0


def cmd_report(args, command_line: str) -> int:
    """`reb report`: a comparison report of everything an MLflow store holds."""
    from reb_dist.io.tracking import resolve_uri
    from reb_dist.reporting.report import collect_results, write_report

    uri = resolve_uri(args.tracking_uri)
    rows, trials = collect_results(uri, args.experiment)
    if not rows and not trials:
        raise SystemExit(f"{uri}: no finished result or trial runs to report")
    for path in write_report(rows, trials, args.output):
        print(path)
    return 0


def cmd_predict(args, command_line: str) -> int:
    """`reb predict`: see reb_dist.commands.predict.predict_images (a model file or an exported one);
    prints scores.csv."""
    from reb_dist.commands.predict import predict_images

    scores = Path(args.output) / "scores.csv"
    started = time.time()
    try:
        predictions = predict_images(args.model, args.images, args.output, args.threshold, args.device)
    except DatasetError:
        # some images could not be scored: the others' scores are results all the same (this run's
        # scores.csv names the bad ones in its error column); the error line follows on stderr, exit 2
        if scores.is_file() and scores.stat().st_mtime >= started:
            print(scores.read_text(), end="")
        raise
    print(scores.read_text(), end="")
    log.info("%d heatmap overlays written to %s", len(predictions), args.output)
    return 0


def cmd_export(args, command_line: str) -> int:
    """`reb export`: see reb_dist.export.writer.export_model."""
    from reb_dist.export.writer import export_model

    exported, metadata = export_model(args.model, args.format, args.output, args.dynamo, args.force)
    print(f"{exported}\n{metadata}")
    return 0


def cmd_cache(args, command_line: str) -> int:
    """`reb cache info|clear`: the feature cache's folder, files and size; or delete its files."""
    from reb_dist.io.feature_cache import FeatureCache, cache_folder

    settings = load_config(args).cache
    cache = FeatureCache(cache_folder(settings), int(settings.max_gb * 1024**3))  # even when disabled
    if args.action == "clear":
        print(f"{cache.folder}: {cache.clear()} feature files deleted")
        return 0
    state = "" if settings.enabled else " (disabled: cache.enabled=false)"
    print(f"folder: {cache.folder}{state}\nfiles: {len(cache.files())}\n"
          f"size: {cache.size() / 1024**3:.2f} GB of {settings.max_gb:g} GB")
    return 0


def cmd_configs(args, command_line: str) -> int:
    """`reb configs [NAME]`: list the packaged config files (name and first comment line), or print one."""
    from reb_dist.config import config_file, packaged_configs

    if args.name:
        sys.stdout.write(config_file(args.name).read_text())
        return 0
    for name, path in packaged_configs().items():
        first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        print(f"{name:18s} {first}")
    print("use one by name (reb sweep --config sample_sweep), or copy it: reb configs sample_sweep > my_sweep.yaml")
    return 0


def cmd_sweep(args, command_line: str) -> int:
    """`reb sweep`: see reb_dist.commands.sweep.sweep_file (jobs/sweep.py runs this too)."""
    from reb_dist.commands.sweep import sweep_file

    sweep_file(args.sweep, args.out, args.tracking_uri, args.experiment)
    return 0


if __name__ == "__main__":
    sys.exit(main())
