"""Shard files: bounds cover the bank once; each file is tied to its bank by a fingerprint."""

import numpy as np
import pytest

from reb_dist.errors import ModelFileError
from reb_dist.io.shard_file import bank_fingerprint, load_shard, read_shard, shard_bounds, write_shards


def test_shard_bounds_cover_the_bank_once():
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_bounds(10, 2, [1, 9]) == [(0, 1), (1, 10)]
    with pytest.raises(ValueError, match="do not split"):
        shard_bounds(10, 2, [5, 4])
    with pytest.raises(ValueError, match="cannot split"):
        shard_bounds(2, 3)


def test_the_fingerprint_is_equal_for_equal_banks_and_changes_with_any_vector_or_the_cut():
    bank = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    fp = bank_fingerprint(bank, 2)
    assert fp == bank_fingerprint(bank.copy(), 2) == bank_fingerprint(np.asfortranarray(bank), 2)
    changed = bank.copy()
    changed[123, 5] = np.nextafter(changed[123, 5], np.float32(np.inf))  # one value, one ulp
    assert bank_fingerprint(changed, 2) != fp
    assert bank_fingerprint(bank, 3) != fp  # shard count
    assert bank_fingerprint(bank, 2, [100, 200]) != fp  # the cut
    assert bank_fingerprint(bank.astype(np.float16), 2) != fp  # storage dtype
    assert bank_fingerprint(bank[:299], 2) != fp  # shape


def test_every_shard_carries_its_banks_fingerprint_and_number(tmp_path):
    bank = np.random.default_rng(1).standard_normal((300, 16)).astype(np.float32)
    paths = write_shards(bank, tmp_path, 3)
    for i, path in enumerate(paths):
        vectors, header = load_shard(path, bank_fingerprint(bank, 3), i)
        assert header["bank_id"] == bank_fingerprint(bank, 3) and (header["shard"], header["shards"]) == (i, 3)
        np.testing.assert_array_equal(vectors, bank[100 * i:100 * (i + 1)])
    with pytest.raises(ModelFileError, match=r"shard-001-of-003.safetensors: expected shard 0 of bank"):
        load_shard(paths[1], bank_fingerprint(bank, 3), 0)


def test_a_shard_file_rewritten_by_another_bank_is_refused_naming_both_fingerprints(tmp_path):
    rng = np.random.default_rng(2)
    bank, other = rng.standard_normal((2, 300, 16)).astype(np.float32)
    expected, found = bank_fingerprint(bank, 2), bank_fingerprint(other, 2)
    paths = write_shards(bank, tmp_path, 2)
    write_shards(other, tmp_path, 2)  # same shapes, same file names
    with pytest.raises(ModelFileError) as err:
        load_shard(paths[1], expected, 1)
    assert str(paths[1]) in str(err.value) and expected in str(err.value) and found in str(err.value)


def test_vectors_that_do_not_match_their_header_are_refused(tmp_path):
    """A file whose header claims the right bank but whose vectors are another's (spliced, corrupt)."""
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    bank = np.random.default_rng(3).standard_normal((300, 16)).astype(np.float32)
    path = write_shards(bank, tmp_path, 2)[1]
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    vectors = load_file(str(path))["vectors"]
    vectors[0, 0] += 1
    save_file({"vectors": vectors}, str(path), meta)
    assert read_shard(path, with_vectors=False)[1]["bank_id"] == bank_fingerprint(bank, 2)
    with pytest.raises(ModelFileError, match="its header claims " + bank_fingerprint(bank, 2)):
        load_shard(path, bank_fingerprint(bank, 2), 1)
    with pytest.raises(ModelFileError, match="its header claims"):
        load_shard(path, None, None)  # even trusting the header, the vectors are checked against it


def test_distinct_banks_given_one_folder_get_distinct_files(tmp_path):
    rng = np.random.default_rng(4)
    full = rng.standard_normal((300, 16)).astype(np.float32)
    few = full[:90]  # a few-shot bank of the same category
    full_paths = write_shards(full, tmp_path, 2, by_fingerprint=True)
    few_paths = write_shards(few, tmp_path, 2, by_fingerprint=True)
    assert {p.parent for p in full_paths} == {tmp_path / bank_fingerprint(full, 2)}
    assert {p.parent for p in few_paths} == {tmp_path / bank_fingerprint(few, 2)}
    for i, p in enumerate(full_paths):  # the few-shot bank left the full bank's files alone
        load_shard(p, bank_fingerprint(full, 2), i)
