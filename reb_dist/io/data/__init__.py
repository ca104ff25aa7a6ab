"""Datasets: reading images and masks, folder layouts, and the torch Dataset."""

from reb_dist.io.data.dataset import (IMAGENET_MEAN, IMAGENET_STD, ImageDataset, few_shot, preprocess, resize_mask,
                                     sample_mask)
from reb_dist.io.data.images import (
    IMAGE_EXTENSIONS,
    image_size,
    is_image_file,
    is_skipped_file,
    list_images,
    read_image,
    read_mask,
)
from reb_dist.io.data.layouts import (
    LAYOUTS,
    btad,
    check_split,
    folder,
    list_categories,
    load_split,
    mvtec_3d,
    mvtec_ad,
    mvtec_loco,
)
from reb_dist.io.data.samples import NORMAL, ClassSplit, Sample

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "LAYOUTS", "NORMAL",
    "ClassSplit", "ImageDataset", "Sample",
    "btad", "check_split", "few_shot", "folder", "image_size", "is_image_file", "is_skipped_file",
    "list_categories", "list_images", "load_split", "mvtec_3d", "mvtec_ad", "mvtec_loco",
    "preprocess", "read_image", "read_mask", "resize_mask", "sample_mask",
]
