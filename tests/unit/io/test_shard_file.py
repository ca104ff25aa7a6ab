"""Shard files: bounds cover the bank once."""

import pytest
from reb_dist.io.shard_file import shard_bounds


def test_shard_bounds_cover_the_bank_once():
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_bounds(10, 2, [1, 9]) == [(0, 1), (1, 10)]
    with pytest.raises(ValueError, match="do not split"):
        shard_bounds(10, 2, [5, 4])
    with pytest.raises(ValueError, match="cannot split"):
        shard_bounds(2, 3)
