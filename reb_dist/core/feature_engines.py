"""Feature engines: what runs the backbone + aggregation forward pass that turns images into patch features.

- "torch": `PatchFeatures` in torch, on any device; on CPU in the channels_last layout, which
  oneDNN's convolutions run faster than the default one.
- "onnxruntime": the same module exported once to ONNX (`ExportableFeatures`: normalised images in,
  (B, h, w, D) features out) and run by ONNX Runtime's CPU provider, which fuses the convolutions
  with their normalisation and activation (docs/RESULTS.md section 12 has the speed-up measured).
- "auto": onnxruntime on CPU when onnxruntime and onnx are installed, else torch (with one log line);
  torch on a GPU.

Both give the same features within float rounding (tests/unit/core/test_feature_engines.py: 1e-4
relative). The ONNX graph is cached as `<folder>/<key>.onnx`, the key hashing what the graph depends
on (backbone name and weight fingerprint, aggregation and its dimensions, image size, torch and ONNX
opset). The key is stored in the graph's metadata too and checked when it is loaded: a graph that
does not load, or holds another key, is rebuilt. A graph is written to a temporary name and renamed,
so a reader never sees half of one.

Precision (`backbone.precision`: fp32, bf16, fp16): on a GPU the torch engine runs the forward pass
under autocast in that dtype (tensor cores); features come out as float32 either way. On CPU
features are always computed in float32: ONNX Runtime's CPU provider, the engine there, runs
float32 (and torch's CPU autocast to float16 took 11x the float32 time on 2 cores here). So a
precision other than fp32 is a GPU setting; `effective_precision` says what a device runs.

Threads: one number (`backbone.threads`) for torch, ONNX Runtime and faiss alike; 0 means the CPUs
this process may use, which under Ray is its task's or actor's share (Ray sets OMP_NUM_THREADS).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from reb_dist.core.features import ExportableFeatures, PatchFeatures
from reb_dist.core.threads import resolve_threads

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnxruntime")
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = tuple(AUTOCAST_DTYPES)
GRAPH_FORMAT = "reb-dist-feature-graph/1"
ONNX_OPSET = 18
KEY_FIELD = "reb_dist.graph_key"  # the graph's metadata entry holding its key


def cache_home() -> Path:
    """$XDG_CACHE_HOME/reb-dist, or ~/.cache/reb-dist when that is unset or relative."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path("~/.cache").expanduser()
    return root / "reb-dist"


def default_graph_folder() -> Path:
    """Where ONNX feature graphs are cached when no cache folder is configured: beside the features'."""
    return cache_home() / "features" / "onnx"


def apply_threads(threads: int = 0) -> int:
    """Set torch's and faiss's thread counts to `resolve_threads(threads)` and return it (ONNX Runtime
    sessions take it when they are made)."""
    n = resolve_threads(threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    try:
        import faiss
    except ImportError:
        return n
    faiss.omp_set_num_threads(n)
    return n


def onnxruntime_available() -> bool:
    """Whether the ONNX engine can run here: onnxruntime to run graphs, onnx for torch to export them."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def effective_precision(precision: str, device: torch.device) -> str:
    """The precision the forward pass runs in on `device`: `precision` on a GPU, "fp32" on CPU.

    Raises:
        ValueError: an unknown precision.
    """
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"backbone.precision must be one of {PRECISIONS}, got {precision!r}")
    return precision if device.type == "cuda" else "fp32"


def resolve_engine(engine: str, device: torch.device) -> str:
    """"auto" -> "onnxruntime" on CPU when it is installed, else "torch"; the others as given.

    Raises:
        ValueError: an unknown engine, or "onnxruntime" on a GPU or without onnxruntime and onnx.
    """
    if engine not in ENGINES:
        raise ValueError(f"backbone.engine must be one of {ENGINES}, got {engine!r}")
    if engine == "auto":
        if device.type != "cpu":
            return "torch"
        if onnxruntime_available():
            return "onnxruntime"
        log.info("backbone.engine=auto: onnxruntime (or onnx) is not installed; features run on torch (channels_last)")
        return "torch"
    if engine == "onnxruntime":
        if device.type != "cpu":
            raise ValueError(f"backbone.engine=onnxruntime runs on CPU; the device is {device.type} (use torch)")
        if not onnxruntime_available():
            raise ValueError("backbone.engine=onnxruntime needs the onnxruntime and onnx packages "
                             "(pip install onnxruntime onnx), or backbone.engine=torch")
    return engine


class TorchEngine:
    """Patch features with torch: (B, 3, S, S) normalised images -> (B, h, w, D) float32 numpy.

    channels_last: the input layout; None: channels_last on CPU (faster there), the default on a GPU.
    precision: "fp32", or the autocast dtype of the forward pass ("bf16", "fp16") on any device
        (the detector asks for it only on a GPU: `effective_precision`).
    """

    name = "torch"

    def __init__(self, features: PatchFeatures, device: torch.device, channels_last: bool | None = None,
                 precision: str = "fp32"):
        if precision not in AUTOCAST_DTYPES:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.device = device
        self.channels_last = device.type == "cpu" if channels_last is None else channels_last
        self.precision = precision
        self.model = features.to(device).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = images.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = AUTOCAST_DTYPES[self.precision]
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            out = self.model(x)
        return out.permute(0, 2, 3, 1).contiguous().float().cpu().numpy()


class _ChannelsLastOutput(nn.Module):
    """Exported graph: normalised images (B, 3, S, S) -> features (B, h, w, D), as every caller wants them."""

    def __init__(self, features: nn.Module):
        super().__init__()
        self.features = features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images).permute(0, 2, 3, 1)


def graph_key(backbone: str, fingerprint: str, aggregation: str, layer_dim: int, target_dim: int,
              image_size: int) -> str:
    """The cache key (32 hex digits) of a feature graph: everything the exported graph depends on."""
    payload = json.dumps({"format": GRAPH_FORMAT, "backbone": backbone, "fingerprint": fingerprint,
                          "aggregation": aggregation, "layer_dim": int(layer_dim), "target_dim": int(target_dim),
                          "image_size": int(image_size), "torch": torch.__version__, "opset": ONNX_OPSET},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def export_graph(features: PatchFeatures, channels: tuple[int, int], image_size: int, path: Path, key: str) -> Path:
    """Export `features` at `image_size` (free batch axis) to `path`, with `key` in its metadata, atomically."""
    import onnx

    module = _ChannelsLastOutput(ExportableFeatures(features, channels)).to("cpu").eval()
    example = torch.zeros(1, 3, image_size, image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about fixed shapes: intended
            torch.onnx.export(module, (example,), tmp, dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["images"], output_names=["features"],
                              dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})
        graph = onnx.load(tmp)
        entry = graph.metadata_props.add()
        entry.key, entry.value = KEY_FIELD, key
        onnx.save(graph, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class OnnxRuntimeEngine:
    """Patch features with ONNX Runtime (CPU): (B, 3, S, S) normalised images -> (B, h, w, D) float32 numpy.

    Args:
        path: the exported graph (`export_graph`).
        threads: intra-op threads (`resolve_threads`).
        key: when given, the key the graph must hold; ValueError when it holds another.
    """

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int, key: str | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: not ORT's notes about its own optimisations
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        found = self.session.get_modelmeta().custom_metadata_map.get(KEY_FIELD)
        if key is not None and found != key:
            raise ValueError(f"{path}: the feature graph was built for other settings (key {found}, want {key})")

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        return self.session.run(None, {"images": x})[0]


def onnxruntime_engine(features: PatchFeatures, channels: tuple[int, int], key: str, image_size: int,
                       folder: Path, threads: int) -> OnnxRuntimeEngine:
    """The ONNX Runtime engine of `features` from the cached graph `<folder>/<key>.onnx`, exported
    when missing, and rebuilt when it does not load or holds another key."""
    path = Path(folder) / f"{key}.onnx"
    if path.is_file():
        try:
            return OnnxRuntimeEngine(path, threads, key)
        except Exception as err:  # a truncated, foreign or stale file: rebuild it
            log.warning("rebuilding the feature graph %s: %s", path, str(err).splitlines()[0][:200])
    log.info("exporting the feature graph to %s (once per backbone, aggregation and image size)", path)
    export_graph(features, channels, image_size, path, key)
    return OnnxRuntimeEngine(path, threads, key)
