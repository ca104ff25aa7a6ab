"""The one predict loop, behind the `ImageScorer` protocol: it reads files and in-memory images,
refuses too-small or unreadable ones in place, batches only the good ones, and makes the normalised
scores and flags in float64 from the scorer's calibration; a `Detector` goes in through
`DetectorScorer`."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from reb_dist.core.thresholds import Calibration, normalise
from reb_dist.pipelines.predict import DetectorScorer, ImageScorer, predict

SIZE = 64  # images of side < 8 are refused


class FakeScorer:
    """Scores an image by its mean pixel value (float32), maps it to a constant map; records batches."""

    def __init__(self, calibration: Calibration | None):
        self.image_size = SIZE
        self.calibration = calibration
        self.batches: list[int] = []

    def score_images(self, images):
        self.batches.append(len(images))
        scores = np.array([im.mean() for im in images], np.float32)
        return scores, np.stack([np.full((SIZE, SIZE), s, np.float32) for s in scores])


def _image(value: int, side: int = 20) -> np.ndarray:
    return np.full((side, side + 3, 3), value, np.uint8)


@pytest.fixture
def inputs(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(_image(100)).save(good)
    tiny = tmp_path / "tiny.png"
    Image.fromarray(_image(50, side=4)).save(tiny)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    return [good, _image(10), tiny, broken, _image(200), _image(3, side=2)]


def test_the_loop_with_any_scorer(inputs):
    # a threshold just above a float32 score (100.0) that rounds to it in float32: not flagged in float64
    threshold = 100.0 + 1e-6
    assert np.float32(threshold) == np.float32(100.0)
    calibration = Calibration(threshold=threshold, method="f1", low=0.0, high=255.0)
    scorer = FakeScorer(calibration)
    assert isinstance(scorer, ImageScorer)
    out = predict(scorer, inputs, batch_size=4)
    assert scorer.batches == [2, 1]  # bad images are never sent to the scorer
    assert [p.path for p in out] == [inputs[0], None, inputs[2], inputs[3], None, None]
    assert [p.error is not None for p in out] == [False, False, True, True, False, True]
    assert "only 7x4 pixels" in out[2].error and "cannot be read" in out[3].error
    assert "only 5x2 pixels" in out[5].error
    for bad in (out[2], out[3], out[5]):
        assert math.isnan(bad.score) and bad.image is None and bad.pixel_map is None
        assert bad.normalised_score is None and bad.anomalous is None
    good = [out[0], out[1], out[4]]
    assert [p.score for p in good] == [100.0, 10.0, 200.0] and all(type(p.score) is float for p in good)
    np.testing.assert_array_equal(out[1].image, inputs[1])
    assert out[0].image.shape == (20, 23, 3) and out[0].pixel_map.shape == (SIZE, SIZE)
    assert [p.anomalous for p in good] == [False, False, True]
    assert out[0].normalised_score < 0.5
    assert [p.normalised_score for p in good] == [float(normalise(s, calibration)) for s in (100.0, 10.0, 200.0)]
    # a given threshold flags; the normalised score stays on the calibration's scale
    given = predict(FakeScorer(calibration), inputs, threshold=50.0)
    assert [p.anomalous for p in given] == [True, False, None, None, True, None]
    assert given[0].normalised_score == out[0].normalised_score


def test_the_loop_without_a_calibration(inputs):
    out = predict(FakeScorer(None), inputs[:2])
    assert [(p.normalised_score, p.anomalous) for p in out] == [(None, None), (None, None)]
    assert [p.anomalous for p in predict(FakeScorer(None), inputs[:2], threshold=50.0)] == [True, False]


def test_a_detector_goes_in_through_its_adapter():
    class Detector:  # what DetectorScorer reads of a Detector
        image_size = 32
        calibration = None
        default_method = "m"

    adapter = DetectorScorer(Detector())
    assert isinstance(adapter, ImageScorer) and not isinstance(Detector(), ImageScorer)
    assert adapter.image_size == 32 and adapter.calibration is None and adapter.method == "m"
