"""Folder layouts of the public anomaly-detection sets (and a plain custom one), each read into a ClassSplit.

Loading only lists files (fast) but validates the structure on the way, so that a missing folder or mask
is reported by path at once; check_split then decodes every file before any long computation starts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from reb_dist.progress import progress_bar

from reb_dist.io.data.images import check_image_side, image_size, is_skipped_file, list_images, read_image, read_mask
from reb_dist.io.data.samples import NORMAL, ClassSplit, Sample
from reb_dist.names import LAYOUTS as LAYOUT_NAMES
from reb_dist.errors import DatasetError

# A subfolder of a dataset root is a category of a layout if it has this training folder.
_TRAIN_DIR = {"mvtec": "train/good", "loco": "train/good", "btad": "train/ok", "mvtec3d": "train/good/rgb"}
_ALIASES = {"mvtec_ad": "mvtec", "mvtec_loco": "loco", "mvtec_3d": "mvtec3d", "mvtec3d_ad": "mvtec3d"}


def _by_name(paths) -> list[Path]:
    return sorted(paths, key=lambda p: p.name)


def _normals(images: list[Path]) -> list[Sample]:
    return [Sample(p, 0) for p in images]


def _mask_index(folder: Path, *, folders: bool = False) -> dict[str, Path]:
    """Masks of a folder keyed by the stem of their image: "000_mask.png" and "000.png" both key "000".

    folders=True: the masks are subfolders named after the image (MVTec LOCO), read_mask ORs their files.
    """
    if folders:
        return {p.name: p for p in _by_name(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    index: dict[str, Path] = {}
    for p in list_images(folder, allow_empty=True):
        index.setdefault(p.stem.removesuffix("_mask"), p)
    return index


def _class_dirs(folder: Path) -> list[Path]:
    """Sorted class subfolders of a test folder; a stray image beside them is an error, not ignored."""
    if not folder.is_dir():
        raise DatasetError(folder, "folder not found")
    dirs = []
    for p in _by_name(folder.iterdir()):
        if p.is_dir():
            if not p.name.startswith("."):
                dirs.append(p)
        elif not is_skipped_file(p):
            raise DatasetError(p, "unexpected file: images belong in a class subfolder (normal or a defect name)")
    if not dirs:
        raise DatasetError(folder, "no class subfolders in it (expected a normal folder and defect folders)")
    return dirs


def _category_dir(root: str | Path, category: str, layout: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(root, "dataset root folder not found")
    cat = root / category
    if not cat.is_dir():
        known = ", ".join(list_categories(layout, root, allow_empty=True)) or "none"
        raise DatasetError(cat, f"category folder not found (categories of layout '{layout}' here: "
                                f"{known}){_category_folder_hint(layout, root)}")
    return cat


def _scan(
    root: str | Path,
    category: str,
    layout: str,
    *,
    require_masks: bool,
    mask_dir: Callable[[Path], Path],
    expected: Callable[[Path, Path], str],
    normal: str = NORMAL,
    sub: str = "",
    mask_folders: bool = False,
    group: Callable[[str], str] = lambda defect: "",
    validation: str | None = None,
) -> ClassSplit:
    """The structure shared by all public layouts: CAT/train/NORMAL[/sub], CAT/test/CLASS[/sub], masks per class.

    mask_dir(test class folder) -> where that class's masks are; expected(mask folder, image) -> the mask
    path an image should have had, for the error message.
    """
    cat = _category_dir(root, category, layout)
    train = _normals(list_images(cat / "train" / normal / sub))
    test: list[Sample] = []
    for d in _class_dirs(cat / "test"):
        images = list_images(d / sub)
        if d.name == normal:
            test += _normals(images)
            continue
        mdir, masks = mask_dir(d), {}
        if mdir.is_dir():
            masks = _mask_index(mdir, folders=mask_folders)
        elif require_masks:
            where = mdir if mdir.parent.is_dir() else mdir.parent
            raise DatasetError(where, f"ground-truth folder not found, but test has the defect folder '{d.name}' "
                                      "(pass require_masks=False to load without masks)")
        for p in images:
            if p.stem not in masks and require_masks:
                raise DatasetError(p, f"no ground-truth mask for this image: expected {expected(mdir, p)} "
                                      "(pass require_masks=False to load without masks)")
            test.append(Sample(p, 1, d.name, masks.get(p.stem), group(d.name)))
    split = ClassSplit(category, cat, train, test, layout=layout)
    if validation is not None:
        vdir = cat / validation
        split.extras["validation"] = _normals(list_images(vdir)) if vdir.is_dir() else []
    return split


def mvtec_ad(root: str | Path, category: str, *, require_masks: bool = True) -> ClassSplit:
    """Load MVTec AD: CAT/train/good, CAT/test/{good,DEFECT}, CAT/ground_truth/DEFECT/NAME_mask.png.

    Returns:
        The category's `ClassSplit`.

    Raises:
        DatasetError: If a folder, image or (with `require_masks`) mask is missing or malformed.
    """
    return _scan(root, category, "mvtec", require_masks=require_masks,
                 mask_dir=lambda d: d.parent.parent / "ground_truth" / d.name,
                 expected=lambda m, p: m / f"{p.stem}_mask.png")


def mvtec_loco(root: str | Path, category: str, *, require_masks: bool = True) -> ClassSplit:
    """MVTec LOCO AD: masks are folders ground_truth/DEFECT/NNN/ of one or more PNGs (OR-ed by read_mask).

    group is "logical" / "structural" because LOCO reports the two anomaly kinds apart;
    validation/good goes to extras["validation"] (empty list if absent).
    Returns and raises as `mvtec_ad`.
    """
    return _scan(root, category, "loco", require_masks=require_masks, mask_folders=True,
                 mask_dir=lambda d: d.parent.parent / "ground_truth" / d.name,
                 expected=lambda m, p: f"{m / p.stem}{os.sep}",
                 group=lambda defect: defect.removesuffix("_anomalies"), validation="validation/good")


def btad(root: str | Path, category: str, *, require_masks: bool = True) -> ClassSplit:
    """Load a BTAD category: NN/train/ok, NN/test/{ok,ko}, NN/ground_truth/ko/NAME.{png,bmp}; "ok" normal.

    Returns and raises as `mvtec_ad`.
    """
    return _scan(root, category, "btad", require_masks=require_masks, normal="ok",
                 mask_dir=lambda d: d.parent.parent / "ground_truth" / d.name,
                 expected=lambda m, p: m / f"{p.stem}.png")


def mvtec_3d(root: str | Path, category: str, *, require_masks: bool = True) -> ClassSplit:
    """MVTec 3D-AD, RGB only: CAT/train/good/rgb, CAT/test/DEFECT/{rgb,gt}/NNN.png; xyz/ is ignored.

    validation/good/rgb goes to extras["validation"]. Returns and raises as `mvtec_ad`.
    """
    return _scan(root, category, "mvtec3d", require_masks=require_masks, sub="rgb",
                 mask_dir=lambda d: d / "gt", expected=lambda m, p: m / f"{p.stem}.png",
                 validation="validation/good/rgb")


def folder(
    train_dir: str | Path,
    test_normal_dir: str | Path,
    test_anomalous_dir: str | Path,
    mask_dir: str | Path | None = None,
    name: str = "custom",
    *,
    require_masks: bool = False,
) -> ClassSplit:
    """A custom set in three folders. Anomalous images directly in test_anomalous_dir get defect_type
    "anomalous", those in its subfolders the subfolder name. Masks (optional) are looked up by stem or
    stem + "_mask", in mask_dir/DEFECT first, then mask_dir.

    Returns:
        A `ClassSplit` named `name`, layout "folder", rooted at the folders' common path.

    Raises:
        DatasetError: If a folder is missing or empty, or (with `require_masks`) an image has no mask.
        ValueError: If `require_masks` is set without a `mask_dir`.
    """
    train = _normals(list_images(train_dir))
    test = _normals(list_images(test_normal_dir))
    anomalous = Path(test_anomalous_dir)
    groups = [("anomalous", list_images(anomalous, allow_empty=True))]
    groups += [(d.name, list_images(d)) for d in _by_name(anomalous.iterdir())
               if d.is_dir() and not d.name.startswith(".")]
    if not any(images for _, images in groups):
        raise DatasetError(anomalous, "empty class folder: no images in it or in its subfolders")
    mdir = Path(mask_dir) if mask_dir is not None else None
    if require_masks and mdir is None:
        raise ValueError("require_masks=True needs a mask_dir")
    if mdir is not None and not mdir.is_dir():
        raise DatasetError(mdir, "mask folder not found")
    common = _mask_index(mdir) if mdir is not None else {}
    for defect, images in groups:
        masks = {**common, **_mask_index(mdir / defect)} if mdir is not None and (mdir / defect).is_dir() else common
        for p in images:
            if p.stem not in masks and require_masks:
                raise DatasetError(p, f"no mask for this image in {mdir} "
                                      f"(looked for {p.stem}.* and {p.stem}_mask.*)")
            test.append(Sample(p, 1, defect, masks.get(p.stem)))
    root = Path(os.path.commonpath([Path(d).absolute() for d in (train_dir, test_normal_dir, anomalous)]))
    return ClassSplit(name, root, train, test, layout="folder")


LAYOUTS: dict[str, Callable[..., ClassSplit]] = {
    "mvtec": mvtec_ad, "loco": mvtec_loco, "btad": btad, "mvtec3d": mvtec_3d, "folder": folder,
}
# the settings check lists data.layout's choices from reb_dist.names, below config: the two must agree
assert tuple(LAYOUTS) == LAYOUT_NAMES, (tuple(LAYOUTS), LAYOUT_NAMES)


def _layout_name(layout: str) -> str:
    key = _ALIASES.get(layout.lower().replace("-", "_"), layout.lower())
    if key not in LAYOUTS:
        raise ValueError(f"unknown dataset layout '{layout}'; known layouts: {', '.join(LAYOUTS)}")
    return key


def load_split(layout: str, root: str | Path, category: str | None = None, **kw) -> ClassSplit:
    """Load one category by layout name. For "folder", root is the base that the relative train_dir,
    test_normal_dir, test_anomalous_dir (and mask_dir) keywords are resolved against.

    Args:
        layout: A key of `LAYOUTS` or an alias ("mvtec_ad", "mvtec-loco", ...).
        root: Dataset root (for "folder", the base of its folders).
        category: Category folder under `root`; needed by all layouts but "folder" (its default name).
        **kw: Keyword arguments of the layout's loader.

    Returns:
        The category's `ClassSplit`.

    Raises:
        ValueError: If the layout is unknown or a category is needed but missing.
        DatasetError: As the layout's loader raises.
    """
    key = _layout_name(layout)
    if key == "folder":
        dirs = {k: Path(root) / kw.pop(k) for k in ("train_dir", "test_normal_dir", "test_anomalous_dir", "mask_dir")
                if kw.get(k) is not None}
        return folder(**dirs, name=kw.pop("name", category or Path(root).name), **kw)
    if category is None:
        known = ", ".join(list_categories(key, root, allow_empty=True)) or "none"
        raise ValueError(f"layout '{key}' needs a category (categories in {root}: {known})")
    return LAYOUTS[key](root, category, **kw)


def list_categories(layout: str, root: str | Path, *, allow_empty: bool = False) -> list[str]:
    """Return the sorted subfolders of root with the training folder the layout expects (e.g. train/good).

    Args:
        layout: A key of `LAYOUTS` or an alias, but not "folder".
        root: The dataset root.
        allow_empty: Return an empty list instead of raising when no category is found.

    Raises:
        ValueError: If the layout is unknown or is "folder".
        DatasetError: If `root` is not a folder, or (unless `allow_empty`) holds no category; when
            `root` is itself a category folder, the message says which --root and --categories to use.
    """
    key = _layout_name(layout)
    if key == "folder":
        raise ValueError("the 'folder' layout has no categories; give its folders directly")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(root, "dataset root folder not found")
    found = sorted(p.name for p in root.iterdir() if (p / _TRAIN_DIR[key]).is_dir())
    if not found and not allow_empty:
        # without this, fit and benchmark loop over nothing and exit 0 having done nothing
        raise DatasetError(root, f"no categories of layout '{key}' in this folder (a category is a subfolder "
                                 f"with {_TRAIN_DIR[key]}/){_category_folder_hint(key, root)}")
    return found


def _category_folder_hint(layout: str, root: Path) -> str:
    """Advice to append to an error when `root` has the layout's training folder (it is a category
    folder, not a dataset root); empty otherwise."""
    if not (root / _TRAIN_DIR[layout]).is_dir():
        return ""
    parent = root.absolute().parent
    return f"; this looks like a category folder: use --root {parent} --categories {root.name}"


def check_split(split: ClassSplit, deep: bool = True, workers: int = 8, resize_to: int | None = None) -> int:
    """Open every image and mask once, so bad input is reported before a long computation starts.

    deep=True decodes all pixels (catches truncated files); deep=False reads headers only.
    Masks are checked against their image's size; with `resize_to` (the run's image size), images
    too small to be resized to it (see `min_image_side`) are refused. Raises the first DatasetError
    in sample order, saying how many other files are bad; returns the number of samples checked.
    """
    samples = split.train + split.test + list(split.extras.get("validation", []))

    def check(s: Sample) -> DatasetError | None:
        try:
            size = read_image(s.image_path).shape[1::-1] if deep else image_size(s.image_path)
            if resize_to is not None:
                check_image_side(s.image_path, size, resize_to)
            if s.mask_path is not None:
                if deep or s.mask_path.is_dir():
                    read_mask(s.mask_path, size, image=s.image_path)
                elif (msize := image_size(s.mask_path)) != tuple(size):
                    raise DatasetError(s.mask_path, f"mask is {msize[0]}x{msize[1]} but its image "
                                                    f"{s.image_path.name} is {size[0]}x{size[1]}")
        except DatasetError as e:
            return e
        return None

    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decodes without holding the GIL
        results = pool.map(check, samples)
        if len(samples) > 200:
            results = progress_bar(results, total=len(samples), desc=f"checking {split.name}", unit="img")
        errors = [e for e in results if e is not None]
    if errors:
        first, more = errors[0], len(errors) - 1
        if more:
            others = ", ".join(e.path.name for e in errors[1:4]) + (", ..." if more > 3 else "")
            raise DatasetError(first.path, f"{first.problem} (and {more} other bad file(s): {others})") from first
        raise first
    return len(samples)
