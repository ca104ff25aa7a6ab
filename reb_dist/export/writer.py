"""Write a saved model as a TorchScript or ONNX file, with its metadata JSON beside it.

The exported file holds the backbone's weights, the bank and its densities, so scoring with it needs
neither the weights package nor faiss: `reb_dist.export.runtime` runs it with onnxruntime or
`torch.jit.load`. The metadata (`<file>.json`) says what preprocessing the runtime must do.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import torch

from reb_dist.export.build import ExportError, build_module, export_metadata
from reb_dist.export.module import OUTPUT_NAMES, ExportedDetector
from reb_dist.export.runtime import metadata_path, torchscript_deprecation_said
from reb_dist.io.atomic import write_atomic, write_text_atomic

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
# opset of the ONNX file: 18 is what torch's dynamo exporter writes natively, and onnxruntime >= 1.14 runs it
ONNX_OPSET = 18


def example_images(module: ExportedDetector, batch: int = 2) -> torch.Tensor:
    """A uint8 batch of the module's input shape to trace with (its values do not matter)."""
    s = module.image_size
    return torch.randint(0, 256, (batch, s, s, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


class NamedOutputs(torch.nn.Module):
    """The detector with its outputs by name (`OUTPUT_NAMES`): what a TorchScript file returns, so a
    deployer reads ``out["scores"]``, not the third element of a tuple."""

    def __init__(self, module: ExportedDetector):
        super().__init__()
        self.detector = module

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(OUTPUT_NAMES, self.detector(images)))


def save_torchscript(module: ExportedDetector, path: str | Path) -> Path:
    """Trace `module` with named outputs (its branches are fixed settings, so tracing keeps them) and
    save it atomically; loaded with torch.jit.load, it returns {name: tensor}."""
    with torchscript_deprecation_said(path), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the fixed loops are intended
        # strict=False: a dict output (of fixed keys) is what we want to record
        traced = torch.jit.trace(NamedOutputs(module), (example_images(module),), check_trace=False, strict=False)
    return write_atomic(path, lambda tmp: traced.save(tmp))


def save_onnx(module: ExportedDetector, path: str | Path, dynamo: bool = False, opset: int = ONNX_OPSET,
              metadata: dict | None = None) -> Path:
    """Export `module` to one self-contained ONNX file (weights inside) with a free batch axis.

    Every output's shape is declared (the exporter's own inference named the map's rows "batch" too),
    and `metadata` is written into the file's metadata_props (nested values as JSON), so a deployer
    who has only the .onnx still finds its preprocessing, threshold and version.

    By default with torch's TorchScript-based exporter (dynamo=False), which needs only `onnx`;
    `dynamo=True` uses torch.export + onnxscript instead: the same scores (within 5e-7 relative on
    the sample), but `reb export` took 53-100 s for the sample model on the shared 2-core machine
    against about 20 s.
    """
    needed = ["onnx", "onnxscript"] if dynamo else ["onnx"]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"{path}: exporting to ONNX needs {', '.join(missing)} (pip install 'reb-dist[export]')")

    def write(tmp: str) -> None:
        names = dict(input_names=["images"], output_names=list(OUTPUT_NAMES))
        with torch.no_grad():
            if dynamo:
                batch = torch.export.Dim("batch", min=1, max=4096)
                torch.onnx.export(module, (example_images(module),), tmp, dynamo=True, external_data=False,
                                  opset_version=opset, dynamic_shapes=({0: batch},), **names)
            else:
                torch.onnx.export(module, (example_images(module),), tmp, dynamo=False, opset_version=opset,
                                  dynamic_axes={n: {0: "batch"} for n in ["images", *OUTPUT_NAMES]}, **names)
        describe_onnx(tmp, module, metadata or {})

    with warnings.catch_warnings():  # tracer warnings about the fixed bank loop and image size: intended
        warnings.simplefilter("ignore")
        return write_atomic(path, write)


def describe_onnx(path: str, module: ExportedDetector, metadata: dict) -> None:
    """Declare each output's shape as the module gives it (axis 0: "batch") and store `metadata` in
    the file's metadata_props, rewriting the ONNX file at `path` in place."""
    import onnx

    with torch.no_grad():
        shapes = [tuple(t.shape) for t in module(example_images(module))]
    graph = onnx.load(path)
    for output, shape in zip(graph.graph.output, shapes):
        dims = output.type.tensor_type.shape.dim
        del dims[:]
        for i, size in enumerate(shape):
            dim = dims.add()
            if i == 0:
                dim.dim_param = "batch"
            else:
                dim.dim_value = size
    del graph.metadata_props[:]
    calibration = metadata.get("calibration") or {}
    props = {**metadata, "threshold": calibration.get("threshold")}  # the one number a deployer looks for
    for key, value in props.items():
        graph.metadata_props.add(key=key, value=value if isinstance(value, str) else json.dumps(value))
    onnx.checker.check_model(graph)
    onnx.save(graph, path)


def export_model(model: str | Path, fmt: str, output: str | Path | None = None,
                 dynamo: bool = False, force: bool = False) -> tuple[Path, Path]:
    """Export a model file (from `reb fit`) to `fmt` ("onnx" or "torchscript").

    Args:
        model: a .safetensors model file; its backbone's weights must be installed here (they are
            copied into the exported file).
        fmt: "onnx" or "torchscript".
        output: the exported file (default: the model's path with .onnx or .pt).
        dynamo: ONNX only: torch's dynamo exporter instead of the TorchScript-based one.
        force: replace an existing output file (never the model itself).

    Returns:
        (the exported file, its metadata JSON).

    Raises:
        ExportError: an unknown format, an output that is the model itself (or its metadata file
            would be), an existing output without `force`, or a model whose scoring method cannot
            be exported. Outputs are checked before any work.
        ModelFileError: the model file cannot be loaded.
    """
    from reb_dist.io.model_file import load_model

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    model = Path(model)
    output = Path(output) if output else model.with_suffix(FORMATS[fmt])
    check_outputs(model, output, force)
    detector = load_model(model, device="cpu")
    try:
        module = build_module(detector, str(model))
        meta = export_metadata(detector, "onnxruntime" if fmt == "onnx" else "torchscript", output.name, str(model))
        if fmt == "onnx":
            save_onnx(module, output, dynamo, metadata=meta)
        else:
            save_torchscript(module, output)
    finally:
        detector.close()
    return output, write_text_atomic(metadata_path(output), json.dumps(meta, indent=2) + "\n")


def check_outputs(model: Path, output: Path, force: bool) -> None:
    """Refuse, before any work, an export that would overwrite the model it reads, or (without
    `force`) an existing file."""
    for target in (output, metadata_path(output)):
        if target.exists() and model.exists() and target.resolve() == model.resolve():
            raise ExportError(f"{target}: is the model being exported; choose another --output")
    existing = [str(t) for t in (output, metadata_path(output)) if t.exists()]
    if existing and not force:
        raise ExportError(f"{existing[0]}: exists; choose another --output or pass --force to replace it")
