"""Image scores and pixel maps against hand-computed values and an independent scipy blur."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from reb_dist.core.anomaly_map import image_scores, pixel_maps


def _hand_maps() -> np.ndarray:
    maps = np.zeros((4, 9, 9), np.float32)
    maps[0, 4, 4] = 9.0  # a single spike, inside pool cell (1, 1)
    maps[1, 3:6, 3:6] = 2.0  # a 3x3 block filling pool cell (1, 1)
    maps[2, 2:5, 2:5] = 2.0  # the same block one patch up-left: 4 of its 9 patches in cell (1, 1)
    maps[3] = -1.0  # all negative, one patch less so
    maps[3, 0, 8] = -0.1
    return maps


def test_image_score_max():
    np.testing.assert_allclose(image_scores(_hand_maps(), "max"), [9.0, 2.0, 2.0, -0.1], rtol=1e-6)


def test_image_score_pool3max_is_the_max_of_a_3x3_stride_3_average():
    # spike: 9/9; aligned block: 18/9; shifted block: best cell holds 4 patches of 2 -> 8/9;
    # negative map: the cell with -0.1 averages (8 * -1 - 0.1) / 9
    expected = [1.0, 2.0, 8 / 9, -8.1 / 9]
    np.testing.assert_allclose(image_scores(_hand_maps(), "pool3max"), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="image score"):
        image_scores(_hand_maps(), "mean")


def _upsampled(patch_maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    x = torch.from_numpy(patch_maps)[:, None]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)[:, 0].double().numpy()


@pytest.mark.parametrize("sigma", [4.0, 2.0])
def test_pixel_maps_are_a_bilinear_upsample_then_a_gaussian_blur(sigma):
    rng = np.random.default_rng(0)
    patch_maps = rng.random((5, 7, 5)).astype(np.float32)
    size = (40, 56)
    got = pixel_maps(patch_maps, size, sigma, batch_size=2)  # batches of 2, 2 and 1
    assert got.shape == (5, 40, 56) and got.dtype == np.float32
    # The blur pads by torch's "reflect" (abcd|cba), which is scipy's "mirror", not scipy's
    # "reflect" (abcd|dcba); both truncate the kernel at 4 sigma.
    expected = np.stack([ndimage.gaussian_filter(x, sigma, mode="mirror", truncate=4.0)
                         for x in _upsampled(patch_maps, size)])
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)


def test_pixel_maps_sigma_zero_is_the_plain_upsample():
    patch_maps = np.random.default_rng(1).random((2, 6, 6)).astype(np.float32)
    got = pixel_maps(patch_maps, 30, sigma=0)
    assert got.shape == (2, 30, 30)
    np.testing.assert_allclose(got, _upsampled(patch_maps, (30, 30)), rtol=0, atol=1e-7)
