"""The closing sentence of a benchmark: who led on which class by image AUROC, and by how much."""

from __future__ import annotations

from reb_dist.reporting.tables import leader_sentence


def rows(category: str, **aurocs: float) -> list[dict]:
    return [{"category": category, "method": m, "image_auroc": v, "pixel_auroc": 0.5} for m, v in aurocs.items()]


def test_a_clear_leader_and_a_tie_on_two_classes():
    table = rows("bottle", ldknn=1.0, knn=1.0, nn1=1.0) + rows("pill", knn=0.86, ldknn=0.894, nn1=0.881)
    assert leader_sentence(table) == (
        "By image AUROC, on bottle ldknn, knn and nn1 tied at 100.0; "
        "on pill ldknn led with 89.4, 1.3 points ahead of nn1 (88.1).")


def test_values_the_table_shows_equal_tie_and_the_gap_is_to_the_next_shown_value():
    # 0.90001 and 0.9 both show as 90.0: a tie for the lead, then two runners-up at 85.0
    table = rows("screw", a=0.9, b=0.90001, c=0.85, d=0.8504)
    assert leader_sentence(table) == "By image AUROC, on screw a and b tied for the lead at 90.0, 5.0 points ahead of c and d (85.0)."


def test_a_close_lead_is_still_a_lead():
    assert leader_sentence(rows("pill", knn=0.8751, ldknn=0.8762)) == (
        "By image AUROC, on pill ldknn led with 87.6, 0.1 points ahead of knn (87.5).")


def test_missing_values_single_methods_and_another_metric():
    table = (rows("a", x=float("nan"), y=0.7) + rows("b", x=float("nan"))
             + [{"category": "c", "method": "x", "image_auroc": None}])
    assert leader_sentence(table) == ("By image AUROC, on a only y was scored (70.0); on b no method has a value; "
                                      "on c no method has a value.")
    assert leader_sentence(rows("a", x=0.7, y=0.6), metric="pixel_auroc") == "By pixel AUROC, on a x and y tied at 50.0."
    assert leader_sentence([]) == "No image_auroc to compare."
