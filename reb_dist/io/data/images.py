"""Reading images and masks as plain arrays, whatever their colour mode or bit depth.

Every failure becomes a DatasetError naming the file, so a bad image among thousands is found by name
instead of surfacing as a bare PIL traceback halfway through feature extraction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from reb_dist.errors import DatasetError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})

# Decoding errors PIL raises for broken files: truncated data, bad chunks, unknown formats.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError)


# Files that may sit among images without being data: dotfiles (.DS_Store), notes, licences, OS litter.
_SKIPPED_SUFFIXES = frozenset({".txt", ".md"})
_SKIPPED_NAMES = frozenset({"thumbs.db", "desktop.ini"})
_SKIPPED_STEMS = frozenset({"readme", "license", "licence", "copying"})

# Stage 2 of every supported backbone has stride 8, so patch features form an (S/8 x S/8) grid for
# images resized to S: a source shorter than that has fewer pixels than feature cells.
FEATURE_STRIDE = 8


def is_image_file(path: str | Path) -> bool:
    """True if the file name has an image extension (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def is_skipped_file(path: str | Path) -> bool:
    """True for files that are silently ignored in image folders (anything else that is no image is an error)."""
    p = Path(path)
    if is_image_file(p):
        return p.name.startswith(".")  # e.g. macOS "._000.png" resource forks
    return (p.name.startswith(".") or p.name.lower() in _SKIPPED_NAMES or p.suffix.lower() in _SKIPPED_SUFFIXES
            or p.stem.lower() in _SKIPPED_STEMS)


def list_images(folder: str | Path, *, allow_empty: bool = False, what: str = "class folder") -> list[Path]:
    """Return the image files of a folder, sorted by name; subfolders are not descended into.

    A file that is neither an image nor skippable (see is_skipped_file) is an error rather than silently
    dropped: a stray .csv or .npy usually means the folder is not what the user thinks it is.

    Args:
        folder: The folder to list.
        allow_empty: Return an empty list instead of raising when there are no images.
        what: What the folder is, for the error message.

    Raises:
        DatasetError: If the folder is missing or a file, holds a non-image file, or (unless
            `allow_empty`) has no images.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(folder, "folder not found" if not folder.exists() else "is a file, expected a folder")
    images = []
    for p in sorted(folder.iterdir(), key=lambda p: p.name):
        if p.is_dir() or is_skipped_file(p):
            continue
        if not is_image_file(p):
            raise DatasetError(p, f"not an image file (expected one of {', '.join(sorted(IMAGE_EXTENSIONS))})")
        images.append(p)
    if not images and not allow_empty:
        raise DatasetError(folder, f"empty {what}: no images in it")
    return images


def _open(path: Path, *, decode: bool = True) -> Image.Image:
    """Open (and by default fully decode) an image; PIL's open is lazy, so truncation shows only on load."""
    if not path.exists():
        raise DatasetError(path, "file not found")
    if path.is_dir():
        raise DatasetError(path, "is a folder, expected an image file")
    if path.stat().st_size == 0:
        raise DatasetError(path, "file is empty (0 bytes)")
    try:
        img = Image.open(path)
        if decode:
            img.load()
    except Image.DecompressionBombError as e:
        raise DatasetError(path, f"image too large to decode safely ({e})") from e
    except PermissionError as e:
        raise DatasetError(path, "permission denied") from e
    except _DECODE_ERRORS as e:
        raise DatasetError(path, f"cannot be read as an image (truncated or not an image file): {e}") from e
    if img.width == 0 or img.height == 0:
        raise DatasetError(path, f"image is empty ({img.width}x{img.height} pixels)")
    return img


def _scale_to_8bit(a: np.ndarray, mode: str) -> np.ndarray:
    """Map high-depth grey values to 0..255 by the full range of their bit depth (65535 -> 255), not by clipping.

    16-bit modes are exact; a 32-bit "I" image whose values fit in 16 bits is taken to be 16-bit data
    (that is what TIFF/PNG writers produce); "F" images in [0, 1] are taken as normalised floats.
    """
    a = a.astype(np.float64)
    top = float(a.max(initial=0.0))
    if mode.startswith("I;16") or (mode == "I" and top <= 65535):
        full = 65535.0
    elif mode == "F" and top <= 1.0:
        full = 1.0
    elif mode == "F" and top <= 255:
        full = 255.0
    elif mode == "F" and top <= 65535:
        full = 65535.0
    else:
        full = float(np.iinfo(np.int32).max)
    return np.clip(np.rint(a * (255.0 / full)), 0, 255).astype(np.uint8)


def _pixels(img: Image.Image, path: Path) -> np.ndarray:
    """8-bit pixels without alpha: HxW for single-channel images, HxWx3 for colour ones."""
    mode = img.mode
    if mode in ("1", "L"):
        return np.asarray(img.convert("L"))
    if mode in ("LA", "La"):
        return np.asarray(img.getchannel(0))
    if mode.startswith("I") or mode == "F":
        return _scale_to_8bit(np.asarray(img), mode)
    try:
        if mode in ("P", "PA"):  # via RGBA so palette transparency is dropped without a PIL warning
            img = img.convert("RGBA")
        return np.asarray(img.convert("RGB"))
    except ValueError as e:
        raise DatasetError(path, f"unsupported colour mode {mode}") from e


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as uint8 HxWx3 RGB: grey is replicated, alpha dropped, 16-bit scaled by 1/257.

    Raises:
        DatasetError: If the file is missing, empty, unreadable or in an unsupported colour mode.
    """
    path = Path(path)
    with _open(path) as img:
        a = _pixels(img, path)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a)


def _read_mask_file(path: Path) -> np.ndarray:
    with _open(path) as img:
        a = _pixels(img, path)
    if a.ndim == 3:  # a colour mask counts where any channel is bright
        a = a.max(axis=2)
    return a > 127


def read_mask(
    path: str | Path, expected_size: tuple[int, int] | None = None, *, image: str | Path | None = None
) -> np.ndarray:
    """Read a ground-truth mask as bool HxW, foreground = value > 127 on an 8-bit scale.

    Thresholding (not `!= 0`) because some sets (magnetic tile) ship JPEG-like non-binary masks.
    A folder is read as the union of all masks in it (MVTec LOCO keeps one file per defect region).
    expected_size is the (W, H) of the image the mask belongs to; `image` only names it in the error.

    Raises:
        DatasetError: If a mask file cannot be read, or sizes differ within a folder or from `expected_size`.
    """
    path = Path(path)
    if path.is_dir():
        files = list_images(path, what="mask folder")
        mask = _read_mask_file(files[0])
        for f in files[1:]:
            m = _read_mask_file(f)
            if m.shape != mask.shape:
                raise DatasetError(f, f"mask is {m.shape[1]}x{m.shape[0]} but {files[0].name} in the same "
                                      f"folder is {mask.shape[1]}x{mask.shape[0]}")
            mask |= m
    else:
        mask = _read_mask_file(path)
    if expected_size is not None and (mask.shape[1], mask.shape[0]) != tuple(expected_size):
        owner = f"its image {Path(image).name}" if image is not None else "its image"
        raise DatasetError(path, f"mask is {mask.shape[1]}x{mask.shape[0]} but {owner} is "
                                 f"{expected_size[0]}x{expected_size[1]}")
    return mask


def min_image_side(image_size: int) -> int:
    """The shortest side (pixels) a source image may have to be resized to `image_size`: the side of
    the patch-feature grid (image_size / 8, e.g. 32 px at 256), below which every feature would be
    made up by upsampling."""
    return max(1, int(image_size) // FEATURE_STRIDE)


def check_image_side(path: str | Path, size: tuple[int, int], image_size: int) -> None:
    """Refuse an image of (W, H) `size` too small to be resized to `image_size` (see `min_image_side`).

    Raises:
        DatasetError: naming the file, its size and the minimum.
    """
    width, height = size
    if min(width, height) < (least := min_image_side(image_size)):
        raise DatasetError(path, f"image is only {width}x{height} pixels: its shorter side must be at least "
                                 f"{least} px (the feature grid at image size {image_size}), or upsampling "
                                 "would make up its features")


def image_size(path: str | Path) -> tuple[int, int]:
    """Return (W, H) from the file header only, without decoding pixels: a cheap existence/format check.

    Raises:
        DatasetError: If the file is missing, empty or not an image.
    """
    path = Path(path)
    with _open(path, decode=False) as img:
        return img.size
