"""The Python API: load or fit a model, score images, evaluate a test set.

A thin layer over what the commands run (`reb_dist.commands.fit` fits, `reb_dist.pipelines.predict` scores,
`reb_dist.pipelines.evaluate` computes metrics), so a script gets the very same scores::

    import reb_dist

    model = reb_dist.Model.fit("/data/mvtec_ad", category="pill", calibrate=True)   # as `reb fit`
    model = reb_dist.load("outputs/models/pill.safetensors")                        # or from its file
    result = model.predict(["new_images/", "one.png", pil_image, rgb_array])
    result.scores, result.normalised_scores, result.flags, result.maps
    result.input_maps[0]      # the first image's map at its own resolution
    result.nearest[0]         # the training patch nearest to its hottest patch (file, cells, distance)
    model.evaluate("/data/mvtec_ad")                     # {"image_auroc": ..., "pixel_auroc": ..., ...}
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from reb_dist.config import DataConfig, RunConfig
from reb_dist.core.detector import Detector, NearestPatch
from reb_dist.core.thresholds import Calibration
from reb_dist.errors import ConfigError, DatasetError
from reb_dist.io.model_file import load_model, model_metadata
from reb_dist.pipelines.evaluate import load_category, score_test_set
from reb_dist.pipelines.predict import find_images, predict

ImageLike = "str | Path | PIL.Image.Image | np.ndarray"  # a file, a folder of images, or an image in memory


@dataclass
class Predictions:
    """Scores of N images, in the order given (a folder's images sorted, in its place).

    Attributes:
        scores: (N,) float64 image scores (the model's first method; larger = more anomalous).
        normalised_scores: (N,) in [0, 1], 0.5 at the model's calibrated threshold; None when the
            model has no calibration (`reb fit` without --calibrate or a tune selection).
        flags: (N,) bool, score >= threshold; None when there is no threshold.
        maps: (N, S, S) float32 anomaly maps at the model's image size S (what the model scored).
        paths: each image's file; None for an image given in memory.
        threshold: the threshold the flags used (given, else the model's), or None.
        input_maps: each image's anomaly map at the image's own resolution (H, W), float32: `maps`
            resized back, to lay over the image as given.
        nearest: each image's nearest training patch to its hottest patch
            (`reb_dist.core.detector.NearestPatch`: the training image file, both patches' grid
            cells, the distance); None for a model saved without its bank's provenance.
    """

    scores: np.ndarray
    normalised_scores: np.ndarray | None
    flags: np.ndarray | None
    maps: np.ndarray
    paths: list[Path | None]
    threshold: float | None
    input_maps: list[np.ndarray] = field(default_factory=list)
    nearest: list[NearestPatch | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.scores)


class Model:
    """A fitted detector with what it was saved with (category, calibration).

    Make one with `Model.load` (a file from `reb fit`) or `Model.fit`; close it (or use `with`) to
    release its bank (a sharded bank's actors).

    Args:
        detector: a fitted detector.
        path: the model file it came from, if any.
    """

    def __init__(self, detector: Detector, path: str | Path | None = None):
        self.detector = detector
        self.path = Path(path) if path is not None else None
        self.category = model_metadata(path).get("category") if path is not None else None

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, engine: str | None = None) -> Model:
        """A model from a file written by `reb fit` (its backbone's weights checked by fingerprint).

        Args:
            path: the .safetensors model file.
            device: where features are computed (default: the one it was fitted with; "auto" picks
                CUDA when there is a GPU).
            engine: what runs the forward pass: "auto" (ONNX Runtime on CPU), "torch" or
                "onnxruntime" (default: the model's setting). Scores agree within float rounding.

        Raises:
            ModelFileError: the file is missing, not a model file, or its backbone weights differ.
        """
        return cls(load_model(path, device, engine=engine), path)

    @classmethod
    def fit(cls, root: str | Path = "sample", category: str | None = None, output: str | Path | None = None,
            settings: RunConfig | list[str] | None = None, calibrate: bool = False,
            images: ImageLike | Iterable[ImageLike] | None = None) -> Model:
        """Fit, save and load a model of one category, exactly as `reb fit` does (MLflow run included,
        unless the settings turn tracking off).

        Args:
            root: the dataset root ("sample": the MVTec AD bottle images that ship with the package).
            category: the category under `root` (default: the only one there is).
            output: the .safetensors file to write (default <output_dir>/models/<category>.safetensors).
            settings: a `RunConfig`, or `section.key=value` overrides of the defaults
                (e.g. ["data.few_shot=8", "scoring.k=5"]); root and category are set on top.
            calibrate: hold out part of the training images to take an image threshold (`reb fit
                --calibrate`), so predictions get normalised scores and flags.
            images: instead of a dataset: the good images to fit from (files, folders, PIL images,
                RGB arrays; `reb fit --images`); no test set is needed. `root` is then not read.

        Raises:
            ConfigError, DatasetError: bad settings, or files of the category that cannot be used.
        """
        from reb_dist.pipelines.evaluate import categories_of
        from reb_dist.commands.fit import fit

        cfg = settings if isinstance(settings, RunConfig) else RunConfig.load(None, list(settings or ()))
        if images is not None:
            return cls._fit_images(cfg, images, category, output, calibrate)
        data = replace(cfg.data, root=str(root), categories=[category] if category else cfg.data.categories)
        cfg = replace(cfg, data=data)
        categories = categories_of(data)
        if len(categories) != 1:
            raise ConfigError(f"{root}: holds categories {categories}; choose one with category=...")
        paths = fit(cfg, str(output) if output is not None else None, calibrate=calibrate)
        return cls.load(paths[categories[0]], cfg.backbone.device)

    @classmethod
    def _fit_images(cls, cfg: RunConfig, images, category: str | None, output, calibrate: bool) -> Model:
        """`fit(images=...)`: in-memory images are written as PNG files beside the model file first, in
        `<model>.images/` (the fit reads files, as `reb fit --images` does, and the model's provenance
        and MLflow input example name them, so they must outlive the fit)."""
        from reb_dist.commands.fit import fit, output_files
        from reb_dist.pipelines.evaluate import images_category

        items = image_items(images)
        if category:
            cfg = replace(cfg, data=replace(cfg.data, categories=[category]))
        elif any(isinstance(item, np.ndarray) for item in items) and not cfg.data.categories:
            cfg = replace(cfg, data=replace(cfg.data, categories=["images"]))
        if not any(isinstance(item, np.ndarray) for item in items):
            written = fit(cfg, str(output) if output is not None else None, calibrate=calibrate, images=items)
        else:
            name = images_category(items, cfg.data)  # data.categories names it here (set above)
            model_path = output_files(str(output) if output is not None else None, [name],
                                      Path(cfg.output_dir) / "models")[name]
            with written_images(model_path.with_suffix(".images"), items) as paths:
                written = fit(cfg, str(model_path), calibrate=calibrate, images=paths)
        return cls.load(next(iter(written.values())), cfg.backbone.device)

    @property
    def calibration(self) -> Calibration | None:
        """The image threshold and score range the model was saved with (None: not calibrated)."""
        return self.detector.calibration

    @property
    def threshold(self) -> float | None:
        """The calibrated image threshold, or None."""
        return self.calibration.threshold if self.calibration is not None else None

    @property
    def image_size(self) -> int:
        """The square side images are resized to, and the maps' side."""
        return self.detector.image_size

    def predict(self, images: ImageLike | Iterable[ImageLike], threshold: float | None = None,
                batch_size: int = 16) -> Predictions:
        """Score images with the model's first method (what `reb predict` does).

        Args:
            images: an image file, a folder (every image under it), a PIL image, an (H, W) / (H, W, 3)
                / (H, W, 4) uint8 array (or floats in [0, 1]), an (N, H, W, 3) batch, or a list of these.
            threshold: flag images whose score is at least this (default: the model's calibrated
                threshold; no flags without one).
            batch_size: images per feature batch.

        Raises:
            DatasetError: an image cannot be scored (unreadable, too small, a folder without images...),
                naming every such image and its problem.
        """
        items = image_items(images)
        predictions = predict(self.detector, items, batch_size, threshold)
        failed = [(i, p) for i, p in enumerate(predictions) if p.error is not None]
        if failed:
            names = [p.path if p.path is not None else f"image {i}" for i, p in failed]
            raise DatasetError(names[0], "; ".join(
                [failed[0][1].error] + [f"{n}: {p.error}" for n, (_, p) in zip(names[1:], failed[1:])]))
        used = threshold if threshold is not None else self.threshold
        return Predictions(
            scores=np.array([p.score for p in predictions], dtype=np.float64),
            normalised_scores=(np.array([p.normalised_score for p in predictions], dtype=np.float64)
                               if self.calibration is not None else None),
            flags=np.array([p.anomalous for p in predictions], dtype=bool) if used is not None else None,
            maps=np.stack([p.pixel_map for p in predictions]).astype(np.float32, copy=False),
            paths=[p.path for p in predictions], threshold=used,
            input_maps=[p.input_map() for p in predictions], nearest=[p.nearest for p in predictions])

    def evaluate(self, root: str | Path = "sample", category: str | None = None, layout: str = "mvtec",
                 data: DataConfig | None = None) -> dict[str, float]:
        """Metrics of the model on a test set: image AUROC, pixel AUROC and AUPRO (where it has masks), ...

        Args:
            root: the dataset root ("sample": the bundled bottle images).
            category: its category (default: the one the model was fitted on).
            layout: mvtec | loco | btad | mvtec3d | folder (for "folder", `root` holds train/,
                test/normal/, test/anomalous/; other folders through `data`).
            data: full data settings instead of root / layout (root, category and image size are
                still set from the arguments and the model).

        Raises:
            ConfigError: no category given and the model does not know its own.
            DatasetError: the test set's files cannot be used.
        """
        category = category or self.category
        if category is None and layout != "folder":
            raise ConfigError(f"{self.path or 'this model'} does not record its category: pass category=...")
        data = replace(data or DataConfig(layout=layout), root=str(root), categories=[category] if category else [],
                       image_size=self.image_size, few_shot=0)
        split = load_category(data, category or Path(root).name)
        result = score_test_set(self.detector, split, data, [self.detector.default_method])
        return dict(result.methods[0].metrics)

    def close(self) -> None:
        """Release the bank's index (stops a sharded bank's actors)."""
        self.detector.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(path: str | Path, device: str | None = None) -> Model:
    """`Model.load`: a model from a file written by `reb fit`."""
    return Model.load(path, device)


def image_items(images) -> list[Path | np.ndarray]:
    """What `predict` takes: files (folders expanded, sorted) and uint8 (H, W, 3) RGB arrays.

    Raises:
        DatasetError: a folder holds no image, or an in-memory image has an unusable shape or values.
        TypeError: something that is not an image, a path or a list of them.
    """
    if isinstance(images, (str, Path)) or _is_pil(images) or (isinstance(images, np.ndarray) and images.ndim < 4):
        images = [images]
    items: list[Path | np.ndarray] = []
    for item in images:
        if isinstance(item, (str, Path)):
            items += find_images([item])
        elif _is_pil(item):
            items.append(np.asarray(item.convert("RGB")))
        elif isinstance(item, np.ndarray):  # one image, or a batch of them
            items += [_rgb(image, len(items) + i) for i, image in enumerate(item if item.ndim == 4 else [item])]
        else:
            raise TypeError(f"image {len(items)}: expected a path, a PIL image or a numpy array, "
                            f"got {type(item).__name__}")
    if not items:
        raise DatasetError(".", "no images given")
    return items


@contextmanager
def written_images(folder: Path, items: list[Path | np.ndarray]) -> Iterator[list[Path]]:
    """`items` as files: each array written as a PNG in `folder`, file items as they are. An older
    `folder` is set aside while the body runs and dropped only when it succeeds; if it fails, the new
    folder goes and the old one comes back, so no half-written set is left."""
    from PIL import Image

    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    try:
        folder.mkdir(parents=True)
        paths = []
        for i, item in enumerate(items):
            if isinstance(item, np.ndarray):
                Image.fromarray(item).save(folder / f"{i:06d}.png")
                item = folder / f"{i:06d}.png"
            paths.append(item)
        yield paths
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        if old.exists():
            old.rename(folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _is_pil(item) -> bool:
    from PIL import Image

    return isinstance(item, Image.Image)


def _rgb(image: np.ndarray, index: int) -> np.ndarray:
    """An in-memory image as uint8 (H, W, 3): grey replicated, alpha dropped, floats in [0, 1] scaled."""
    name = f"image {index}"
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise DatasetError(name, f"array of shape {image.shape}: expected (H, W), (H, W, 3) or (H, W, 4)")
    image = image[..., :3]
    if np.issubdtype(image.dtype, np.floating):
        if not (np.isfinite(image).all() and image.min() >= 0 and image.max() <= 1):
            raise DatasetError(name, "float array with values outside [0, 1]: give uint8 0..255 or floats 0..1")
        image = np.round(image * 255)
    elif image.dtype != np.uint8:
        if image.min() < 0 or image.max() > 255:
            raise DatasetError(name, f"{image.dtype} array with values outside 0..255: give uint8 RGB")
    return np.ascontiguousarray(image, dtype=np.uint8)
