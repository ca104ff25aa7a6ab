"""The torch search (the GPU path, no faiss) equals faiss's `BankIndex`, here on CPU tensors."""

import importlib.util
import sys

import numpy as np
import pytest
import torch

from reb_dist.core.ldknn import BankIndex, BankScorer, Index, parse_method
from reb_dist.core.ldknn import torch_search
from reb_dist.core.ldknn.torch_search import TorchIndex, torch_knn

TOL = dict(rtol=1e-5, atol=1e-6)
# small blocks that divide neither the bank (2400) nor the queries (700): candidates cross many
# blocks; the last has fewer bank points per block than K + spare candidates
BLOCKS = [dict(query_block=64, bank_block=331), dict(query_block=700, bank_block=2400),
          dict(query_block=7, bank_block=13)]


def assert_same(found, expected, exact_distances=False):
    np.testing.assert_array_equal(found[1], expected[1])
    if exact_distances:
        np.testing.assert_array_equal(found[0], expected[0])
    else:
        np.testing.assert_allclose(found[0], expected[0], **TOL)
    assert found[0].dtype == np.float32 and found[1].dtype == np.int64


@pytest.fixture
def grid():
    """Points of a 3^4 integer grid, each many times over: distances are exact in float32 and tie
    massively (far more equal neighbours than K + spare candidates), so only ties by id agree."""
    rng = np.random.default_rng(3)
    bank = rng.integers(0, 3, (523, 4)).astype(np.float32)
    queries = rng.integers(0, 3, (211, 4)).astype(np.float32)
    return bank, queries


@pytest.mark.parametrize("k", [1, 5, 9, 17])
@pytest.mark.parametrize("blocks", BLOCKS[:2])
def test_torch_knn_equals_faiss(bank_and_queries, k, blocks):
    bank, queries = bank_and_queries
    found = torch_knn(torch.from_numpy(bank), torch.from_numpy(queries), k, **blocks)
    assert_same(found, BankIndex(bank).search(queries, k))


def test_torch_knn_is_the_same_whatever_the_blocks(bank_and_queries):
    bank, queries = bank_and_queries
    bank_t, queries_t = torch.from_numpy(bank), torch.from_numpy(queries[:40])
    first, *others = [torch_knn(bank_t, queries_t, 9, **b) for b in BLOCKS]
    for other in others:
        assert_same(other, first, exact_distances=True)


@pytest.mark.parametrize("k", [1, 9, 30])
def test_ties_and_duplicates_are_broken_by_id_as_faiss_does(grid, k):
    bank, queries = grid
    faiss_index = BankIndex(bank)
    found = torch_knn(torch.from_numpy(bank), torch.from_numpy(queries), k, query_block=50, bank_block=61)
    assert_same(found, faiss_index.search(queries, k), exact_distances=True)
    points = np.arange(0, len(bank), 4)
    self_found = TorchIndex(bank, "cpu", query_block=50, bank_block=61).search_bank_points(points, k)
    assert_same(self_found, faiss_index.search_bank_points(points, k), exact_distances=True)
    few = queries[:7]  # faiss searches fewer than 20 queries without BLAS: same answer
    assert_same(torch_knn(torch.from_numpy(bank), torch.from_numpy(few), k, bank_block=61),
                faiss_index.search(few, k), exact_distances=True)


def test_ties_go_to_the_lowest_ids_whatever_order_topk_returns_them_in(grid, monkeypatch):
    """torch.topk may return any of equal values (on a GPU it does); make it pick the highest ids."""
    topk = torch.topk

    def highest_ids_first(d, k, dim, largest, sorted):
        values, cols = topk(d.flip(1), k, dim=dim, largest=largest, sorted=sorted)
        return values, d.shape[1] - 1 - cols

    monkeypatch.setattr(torch, "topk", highest_ids_first)
    distinct, queries = grid
    bank = np.repeat(distinct[:40], 20, axis=0)  # 20 copies in a row: more equal points than candidates
    queries = np.concatenate([distinct[:40], queries])
    faiss_result = BankIndex(bank).search(queries, 9)
    for bank_block in (333, len(bank)):
        found = torch_knn(torch.from_numpy(bank), torch.from_numpy(queries), 9, bank_block=bank_block)
        assert_same(found, faiss_result, exact_distances=True)


def test_far_from_the_origin_spare_candidates_still_give_the_true_neighbours():
    """Features' norms are large next to their distances, so |b|^2 - 2 q.b cancels in float32 and
    ranks near neighbours wrongly; the spare candidates, re-ranked exactly, recover the true K."""
    rng = np.random.default_rng(5)
    bank = (100 + rng.standard_normal((2000, 24))).astype(np.float32)
    queries = (100 + 0.7 * rng.standard_normal((500, 24))).astype(np.float32)
    exact = ((queries[:, None].astype(np.float64) - bank[None]) ** 2).sum(-1)
    truth = np.argsort(exact, axis=1, kind="stable")[:, :9]
    found = torch_knn(torch.from_numpy(bank), torch.from_numpy(queries), 9, bank_block=301)
    np.testing.assert_array_equal(found[1], truth)
    np.testing.assert_allclose(found[0], np.take_along_axis(exact, truth, 1), rtol=1e-5)
    np.testing.assert_array_equal(BankIndex(bank).search(queries, 9)[1], truth)


def test_torch_index_search_and_bank_points_equal_bank_index(bank_and_queries):
    bank, queries = bank_and_queries
    ours, theirs = TorchIndex(bank, "cpu", query_block=128, bank_block=1000), BankIndex(bank)
    assert isinstance(ours, Index) and len(ours) == 2400 and ours.dim == 24
    assert_same(ours.search(queries, 9, batch_size=333), theirs.search(queries, 9))
    points = np.arange(5, len(bank), 7)
    assert_same(ours.search_bank_points(points, 9), theirs.search_bank_points(points, 9))
    np.testing.assert_array_equal(ours.vectors(points[:, None]), theirs.vectors(points[:, None]))


def test_duplicated_bank_points_drop_self_as_bank_index_does(bank_and_queries):
    """Each point three times: a point's own id may be pushed out of its K+1 by its copies."""
    bank = np.repeat(bank_and_queries[0][:300], 3, axis=0)
    points = np.arange(0, len(bank), 2)
    found = TorchIndex(bank, "cpu", bank_block=111).search_bank_points(points, 4)
    assert_same(found, BankIndex(bank).search_bank_points(points, 4), exact_distances=False)
    assert (found[1] != points[:, None]).all()


def test_k_above_the_bank_size_is_clipped_as_bank_index_does(bank_and_queries):
    bank, queries = bank_and_queries[0][:7], bank_and_queries[1][:40]
    found = TorchIndex(bank, "cpu", bank_block=3).search(queries, 20)
    assert found[1].shape == (40, 7)
    assert_same(found, BankIndex(bank).search(queries, 20))
    assert_same(TorchIndex(bank, "cpu").search_bank_points(np.arange(7), 6),
                BankIndex(bank).search_bank_points(np.arange(7), 6))
    for index in (TorchIndex(bank, "cpu"), BankIndex(bank)):
        with pytest.raises(ValueError, match="K=7 needs more than 7 bank points"):
            index.search_bank_points(np.arange(3), 7)


def test_float16_storage_equals_bank_index_float16(bank_and_queries):
    bank, queries = bank_and_queries
    half = TorchIndex(bank, "cpu", dtype="float16", bank_block=500)
    assert half._bank.dtype == torch.float16
    assert_same(half.search(queries, 9), BankIndex(bank, dtype="float16").search(queries, 9))


def test_scores_from_a_torch_index_equal_scores_from_faiss(bank_and_queries):
    bank, queries = bank_and_queries
    methods = [parse_method(m, k=5) for m in ("ldknn", "knn", "lof", "ldof")]
    ours = BankScorer(TorchIndex(bank, "cpu", bank_block=700)).score(methods, queries)
    theirs = BankScorer(BankIndex(bank)).score(methods, queries)
    for m in methods:
        np.testing.assert_allclose(ours[m], theirs[m], rtol=1e-5, atol=1e-5, err_msg=m.label)


def test_closed_index_and_bad_arguments_are_errors(bank_and_queries):
    bank, queries = bank_and_queries
    with pytest.raises(ValueError, match="storage dtype"):
        TorchIndex(bank, "cpu", dtype="int8")
    with pytest.raises(ValueError, match="non-empty"):
        TorchIndex(bank[:0], "cpu")
    with pytest.raises(ValueError, match="K >= 1"):
        torch_knn(torch.from_numpy(bank), torch.from_numpy(queries), 0)
    index = TorchIndex(bank, "cpu")
    index.close()
    with pytest.raises(RuntimeError, match="closed"):
        index.search(queries, 3)
    assert len(index) == len(bank)


def test_module_imports_neither_faiss_nor_the_faiss_search(monkeypatch, bank_and_queries):
    """Loaded on its own with faiss and search.py made unimportable, it still loads and searches."""
    monkeypatch.setitem(sys.modules, "faiss", None)
    monkeypatch.setitem(sys.modules, "reb_dist.core.ldknn.search", None)
    spec = importlib.util.spec_from_file_location("torch_search_alone", torch_search.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    bank, queries = bank_and_queries
    assert module.TorchIndex(bank, "cpu").search(queries[:3], 2)[1].shape == (3, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_search_equals_cpu_search(bank_and_queries):
    bank, queries = bank_and_queries
    cpu = TorchIndex(bank, "cpu")
    gpu = TorchIndex(bank, "cuda", bank_block=1000)
    assert_same(gpu.search(queries, 9), cpu.search(queries, 9))
    points = np.arange(0, len(bank), 5)
    assert_same(gpu.search_bank_points(points, 9), cpu.search_bank_points(points, 9))
