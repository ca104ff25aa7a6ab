"""Every CSV file reb-dist writes reads back with the csv module, whatever commas and quotes its
values hold (method specs such as ldknn(k=9,alpha=1), paths such as `lot 3, "B".png`)."""

from __future__ import annotations

import csv
import io
import shutil

import pytest

from reb_dist.config import SAMPLE_DATA, RunConfig
from reb_dist.commands.fit import fit
from reb_dist.commands.predict import predict_images
from reb_dist.core.ldknn import ScoringMethod
from reb_dist.pipelines.selection import Selection, write_selection
from reb_dist.reporting.report import write_report
from tests.conftest import BOTTLE

ODD = 'lot 3, "B"'  # a comma and a quote in one name


def read_csv(path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text(), newline="")))


def test_report_csv_keeps_method_specs_and_weight_paths_whole(tmp_path):
    rows = [{"category": "bottle", "backbone": "efficientnet_lite0", "weights": f"/w/{ODD}.safetensors",
             "method": "ldknn(k=9,alpha=1)", "mode": "exact", "image_auroc": 0.5, "pixel_auroc": None, "aupro": 0.25}]
    write_report(rows, [], tmp_path)
    back = read_csv(tmp_path / "report.csv")
    assert back == [{"category": "bottle", "backbone": "efficientnet_lite0", "weights": f"/w/{ODD}.safetensors",
                     "method": "ldknn(k=9,alpha=1)", "mode": "exact", "image_auroc": "0.500000", "pixel_auroc": "",
                     "aupro": "0.250000", "query_recall": "", "density_recall": ""}]


def test_selection_csv_keeps_a_map_spec_whole(tmp_path):
    s = Selection(category=ODD, k=5, alpha=0.5, val_metrics={"val_image_auroc": 0.9, "val_pixel_auroc": 0.8},
                  trials=3, seconds=1.0, map=ScoringMethod("ldknn", 9, 0.1), map_val_metrics={"map_objective": 0.7},
                  calibration={"threshold": 12.5})
    write_selection(tmp_path, [s], [], {}, {})
    (row,) = read_csv(tmp_path / "selection.csv")
    assert row["category"] == ODD and row["map_method"] == "ldknn:k=9,alpha=0.1"
    assert (row["k"], row["val_map_objective"], row["threshold"]) == ("5", "0.7000", "12.5")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A model fitted on two images (quick: a bank is all scores.csv needs)."""
    cfg = RunConfig.load(None, BOTTLE + ["data.few_shot=2"])
    return fit(cfg, str(tmp_path_factory.mktemp("fit") / "bottle.safetensors"))["bottle"]


def test_scores_csv_round_trips_a_path_with_a_comma_and_a_quote(model, tmp_path):
    image = tmp_path / "in" / f"{ODD}.png"
    image.parent.mkdir()
    shutil.copy(SAMPLE_DATA / "bottle" / "test" / "broken_large" / "000.png", image)
    predictions = predict_images(model, [image], tmp_path / "out", device="cpu")
    with open(tmp_path / "out" / "scores.csv", newline="") as fh:
        header, row = list(csv.reader(fh))
    assert header[:2] == ["image", "score"] and "nearest_train_image" in header
    assert row[0] == str(image) and float(row[1]) == float(f"{predictions[0].score:.6g}")
