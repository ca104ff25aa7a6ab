"""Samples -> tensors for an ImageNet-pretrained backbone."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from reb_dist.io.data.images import check_image_side, read_image, read_mask
from reb_dist.io.data.images import image_size as image_size_of
from reb_dist.io.data.samples import Sample

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess(image: np.ndarray, image_size: int) -> torch.Tensor:
    """Turn uint8 HxWx3 into float32 3xSxS: bicubic resize (PIL, as backbones were trained), ImageNet-normalise.

    Shared by training, evaluation and single-image inference so they cannot drift apart.
    """
    resized = Image.fromarray(image).resize((image_size, image_size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x - mean) / std).contiguous()


def resize_mask(mask: np.ndarray, image_size: int) -> torch.Tensor:
    """Resize a bool HxW mask to a float32 1xSxS tensor of 0/1, nearest-neighbour so it stays binary."""
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((image_size, image_size), Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(resized) > 127).float().unsqueeze(0)


def sample_mask(sample: Sample, image_size: int) -> np.ndarray:
    """A sample's (S, S) bool mask as `ImageDataset` makes it (all False without one), read without
    decoding the image (its size, for the mask check, comes from the header)."""
    if sample.mask_path is None:
        return np.zeros((image_size, image_size), dtype=bool)
    mask = read_mask(sample.mask_path, image_size_of(sample.image_path), image=sample.image_path)
    return resize_mask(mask, image_size)[0].numpy() > 0.5


class ImageDataset(Dataset):
    """dict(image=3xSxS float32, mask=1xSxS float32 0/1, label=int, index=int) per sample.

    The mask is all zero for normal images, for anomalous ones without a mask, and when with_masks=False
    (then no mask file is read), so batches always collate the same keys. An image too small for
    `image_size` (see `min_image_side`) raises a DatasetError naming it.

    Args:
        samples: The samples, indexed in this order.
        image_size: Side S of the square tensors.
        with_masks: Read ground-truth masks where samples have them.
    """

    def __init__(self, samples: Sequence[Sample], image_size: int = 256, with_masks: bool = True):
        self.samples = list(samples)
        self.image_size = int(image_size)
        self.with_masks = with_masks

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        image = read_image(s.image_path)
        # also here, not only in check_split: data.check_files=false skips that check
        check_image_side(s.image_path, image.shape[1::-1], self.image_size)
        if self.with_masks and s.mask_path is not None:
            size = (image.shape[1], image.shape[0])
            mask = resize_mask(read_mask(s.mask_path, size, image=s.image_path), self.image_size)
        else:
            mask = torch.zeros(1, self.image_size, self.image_size)
        return dict(image=preprocess(image, self.image_size), mask=mask, label=int(s.label), index=int(index))


def few_shot(samples: Sequence[Sample], n: int) -> list[Sample]:
    """Return the first n samples by image path: a deterministic few-shot subset, the same on any run.

    Raises:
        ValueError: If `n` is below 1 or more than the samples available.
    """
    if n < 1:
        raise ValueError(f"few-shot count must be at least 1, got {n}")
    if n > len(samples):
        raise ValueError(f"few-shot count {n} is more than the {len(samples)} samples available")
    return sorted(samples, key=lambda s: str(s.image_path))[:n]
