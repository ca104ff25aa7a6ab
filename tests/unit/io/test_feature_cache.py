"""The feature cache: a changed input is a miss, an unchanged one a hit with the very same floats; a
second run on the same class runs no backbone; eviction bounds the folder; clear empties it; a broken
file is recomputed, never an error or a wrong result."""

from __future__ import annotations

import copy
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reb_dist.cli import main
from reb_dist.config import SAMPLE_DATA, CacheConfig, RunConfig, ScoringConfig
from reb_dist.core.backbones import build_backbone, feature_fingerprint
from reb_dist.core.detector import Detector
from reb_dist.detectors import detector_scoring
from reb_dist.core.feature_engines import OnnxRuntimeEngine, TorchEngine
from reb_dist.io.data import Sample
from reb_dist.io.feature_cache import (FEATURE_CACHE_FORMAT, FeatureCache, default_folder, extraction_settings,
                                       feature_key, file_sha256)
from reb_dist.pipelines.evaluate import evaluate_category, extract_samples, extract_with_masks, load_category

from tests.conftest import BOTTLE

BOTTLE_DIR = SAMPLE_DATA / "bottle"
SIZE = 64  # small images: every extraction here takes a fraction of a second


@pytest.fixture
def forwards(monkeypatch):
    """Images passed through the backbone, per forward call of either feature engine."""
    seen: list[int] = []
    for engine in (TorchEngine, OnnxRuntimeEngine):
        def counting(self, images, original=engine.__call__):
            seen.append(int(images.shape[0]))
            return original(self, images)

        monkeypatch.setattr(engine, "__call__", counting)
    return seen


@pytest.fixture(scope="module")
def backbone():
    return build_backbone("efficientnet_lite0")


def make_detector(backbone, image_size=SIZE, **backbone_settings) -> Detector:
    return Detector(backbone, detector_scoring(ScoringConfig()), image_size, device="cpu", **backbone_settings)


@pytest.fixture
def images(tmp_path) -> list[Sample]:
    """Four real bottle photos, downsized and written as PNG files of their own."""
    folder = tmp_path / "images"
    folder.mkdir()
    samples = []
    for src in sorted((BOTTLE_DIR / "train" / "good").glob("*.png"))[:4]:
        Image.open(src).convert("RGB").resize((96, 96)).save(folder / src.name)
        samples.append(Sample(folder / src.name, 0))
    return samples


@pytest.fixture
def cache(tmp_path) -> FeatureCache:
    return FeatureCache(tmp_path / "cache", 10**9)


def extract(detector, samples, cache):
    features, _ = extract_samples(detector, samples, RunConfig().data, "test", cache)
    return features


# --- keys


def test_the_key_changes_with_every_input_and_with_nothing_else(tmp_path, backbone, images):
    base = extraction_settings(make_detector(backbone))
    assert base["fingerprint"] == backbone.fingerprint and base["image_size"] == SIZE
    image = file_sha256(images[0].image_path)
    key = feature_key(base, image)
    changed = [{"fingerprint": "0" * 16}, {"backbone": "resnet18"}, {"image_size": SIZE * 2},
               {"aggregation": "adaptive"}, {"layer_dim": 512}, {"target_dim": 512}, {"device": "cuda"},
               {"engine": "torch" if base["engine"] != "torch" else "onnxruntime"}]
    keys = {feature_key({**base, **c}, image) for c in changed} | {key, feature_key(base, "f" * 64)}
    assert len(keys) == len(changed) + 2

    # the image's content counts, not its path or its modification time
    moved = shutil.copyfile(images[0].image_path, tmp_path / "elsewhere.png")
    os.utime(moved, (1, 1))
    assert file_sha256(moved) == image
    assert FeatureCache(tmp_path, 1).key(base, moved) == key
    Image.open(moved).convert("RGB").rotate(1).save(moved)
    assert FeatureCache(tmp_path, 1).key(base, moved) != key


def test_a_repeated_extraction_hits_with_the_same_floats_and_runs_no_backbone(backbone, images, cache, forwards):
    detector = make_detector(backbone)
    plain, _ = extract_samples(detector, images, RunConfig().data, "plain", None)
    first = extract(detector, images, cache)
    assert sum(forwards) == 2 * len(images) and len(cache.files()) == len(images)
    forwards.clear()
    again = extract(make_detector(backbone), images, cache)
    assert forwards == [] and again.dtype == np.float32
    assert np.array_equal(again, first) and np.array_equal(first, plain)


def test_changed_weights_image_size_aggregation_or_image_bytes_miss(backbone, images, cache, forwards):
    data = RunConfig().data
    reference = extract(make_detector(backbone), images, cache)
    stored = len(cache.files())

    def misses(detector, samples=images):
        forwards.clear()
        features = extract(detector, samples, cache)
        return sum(forwards), features

    # other weights: one stage-1 weight nudged, so the fingerprint (and the features) change
    model = copy.deepcopy(backbone.model)
    model.net.conv_stem.weight.data += 0.05
    nudged = replace(backbone, model=model, fingerprint=feature_fingerprint(backbone.name, model.net))
    assert nudged.fingerprint != backbone.fingerprint
    n, features = misses(make_detector(nudged))
    assert n == len(images) and not np.allclose(features, reference)

    n, features = misses(make_detector(backbone, image_size=SIZE + 32))
    assert n == len(images) and features.shape[1] > reference.shape[1]

    n, features = misses(make_detector(backbone, aggregation="adaptive"))  # same dims, other aggregation
    assert n == len(images) and features.shape[-1] == 1024
    n, features = misses(make_detector(backbone, aggregation="adaptive", target_dim=512))
    assert n == len(images) and features.shape[-1] == 512
    n, _ = misses(make_detector(backbone, aggregation="adaptive", layer_dim=512, target_dim=512))
    assert n == len(images)

    # one image's bytes change (same path, same size): only that image is extracted again
    path = images[2].image_path
    pixels = np.asarray(Image.open(path)).copy()
    pixels[40:50, 40:50] = 255 - pixels[40:50, 40:50]
    Image.fromarray(pixels).save(path)
    n, features = misses(make_detector(backbone))
    assert n == 1
    assert np.array_equal(features[[0, 1, 3]], reference[[0, 1, 3]])
    assert not np.array_equal(features[2], reference[2])
    assert np.array_equal(features[2], extract_samples(make_detector(backbone), images[2:3], data, "x")[0][0])

    # everything unchanged hits again
    n, _ = misses(make_detector(backbone))
    assert n == 0 and len(cache.files()) == stored + 5 * len(images) + 1


def test_masks_of_cached_images_are_read_without_the_backbone(cfg, detector, split, tmp_path, forwards):
    cache = FeatureCache(tmp_path / "cache", 10**9)
    test = [s for s in split.test if s.mask_path is not None][:3] + [s for s in split.test if s.mask_path is None][:3]
    assert len(test) == 6
    plain_features, plain_masks = extract_with_masks(detector, test, cfg.data)
    forwards.clear()
    extract_with_masks(detector, test, cfg.data, cache=cache)
    assert sum(forwards) == len(test)
    forwards.clear()
    features, masks = extract_with_masks(detector, test, cfg.data, cache=cache)
    assert forwards == []
    assert np.array_equal(features, plain_features) and np.array_equal(masks, plain_masks) and masks.any()


# --- the pipelines


def test_a_second_evaluation_with_other_methods_extracts_nothing_and_agrees(tmp_path, forwards):
    cached = [*BOTTLE, "data.image_size=128", f"cache.dir={tmp_path / 'cache'}"]
    first = evaluate_category(RunConfig.load(None, [*cached, "scoring.methods=[ldknn,knn]"]), "bottle")
    assert sum(forwards) == 16 + 15 and first.timings["features"] > 0
    forwards.clear()
    second = evaluate_category(RunConfig.load(None, [*cached, "scoring.methods=[knn,nn1]"]), "bottle")
    assert forwards == []
    assert second.timings["features"] == 0.0 and second.timings["feature_cache"] > 0
    uncached = evaluate_category(RunConfig.load(None, [*cached, "scoring.methods=[knn]", "cache.enabled=false"]),
                                 "bottle")
    assert "feature_cache" not in uncached.timings
    knn = [next(m for m in r.methods if m.method.name == "knn") for r in (first, second, uncached)]
    for m in knn[1:]:
        assert m.metrics == knn[0].metrics and np.array_equal(m.image_scores, knn[0].image_scores)
    assert "pixel_auroc" in knn[0].metrics


def test_class_tables_reuses_the_features_of_an_evaluation(tmp_path, forwards):
    from reb_dist.pipelines.selection import class_tables

    cached = [*BOTTLE, "data.image_size=128", f"cache.dir={tmp_path / 'cache'}", "tune.validation=test",
              "tune.k_max=4"]
    cfg = RunConfig.load(None, cached)
    evaluate_category(cfg, "bottle")
    forwards.clear()
    tables = class_tables("bottle", cfg.data, cfg.backbone, cfg.scoring, cfg.bank, cfg.tune, cache=cfg.cache)
    assert forwards == []  # bank, validation and test images are all among the evaluated ones
    forwards.clear()
    plain = class_tables("bottle", cfg.data, cfg.backbone, cfg.scoring, cfg.bank, cfg.tune)
    assert sum(forwards) == 16 + 15
    # the same bank (its images batch as before); validation and test images were extracted in the
    # evaluation's batches, which CPU kernels may round differently from these subsets' batches
    assert np.array_equal(tables.val.bank_dist2, plain.val.bank_dist2)
    for mine, theirs in ((tables.val, plain.val), (tables.test, plain.test)):
        np.testing.assert_allclose(mine.nn_dist2, theirs.nn_dist2, rtol=1e-4, atol=1e-3)
    assert np.array_equal(tables.test_masks, plain.test_masks)


# --- the folder: size, eviction, clear, broken files


def fake(i: int, shape=(4, 4, 8)) -> np.ndarray:
    return np.random.default_rng(i).normal(size=shape).astype(np.float32)


def key_of(i: int) -> str:
    return feature_key({"test": True}, f"{i:064x}")


def test_eviction_keeps_the_folder_under_its_limit_dropping_the_least_recently_used(tmp_path):
    probe = FeatureCache(tmp_path / "probe", 10**9)
    probe.store(key_of(0), fake(0))
    one = probe.size()
    cache = FeatureCache(tmp_path / "cache", int(4.5 * one))
    past = 1_000_000_000
    for i in range(4):
        cache.store(key_of(i), fake(i))
        os.utime(cache.path(key_of(i)), ns=(past + i, past + i))  # stored in order, long ago
    assert cache.lookup(key_of(0)) is not None  # a hit: 0 becomes the most recently used
    for i in range(4, 7):
        cache.store(key_of(i), fake(i))
        assert cache.size() <= cache.max_bytes
    assert cache.lookup(key_of(0)) is not None  # the oldest stored, but recently used: kept
    assert all(cache.lookup(key_of(i)) is None for i in (1, 2, 3))
    for i in range(7, 12):
        cache.store(key_of(i), fake(i))
        assert cache.size() <= cache.max_bytes
    assert np.array_equal(cache.lookup(key_of(11)), fake(11))
    assert FeatureCache(tmp_path / "cache", cache.max_bytes).size() == cache.size() <= cache.max_bytes


def test_clear_empties_the_cache_and_leaves_other_files_alone(tmp_path):
    cache = FeatureCache(tmp_path, 10**9)
    for i in range(3):
        cache.store(key_of(i), fake(i))
    (tmp_path / "notes.txt").write_text("mine")
    leftover = cache.path(key_of(0)).with_name(f".{key_of(0)}.safetensors.123.0123abcd.tmp")
    leftover.write_bytes(b"half")
    assert len(cache.files()) == 3 and cache.size() > 0
    assert cache.clear() == 3
    assert cache.files() == [] and cache.size() == 0 and cache.lookup(key_of(1)) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip", "foreign", "other_key", "empty"])
def test_a_broken_file_is_a_miss_and_is_removed(tmp_path, damage):
    cache = FeatureCache(tmp_path, 10**9)
    cache.store(key_of(1), fake(1))
    path = cache.path(key_of(1))
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[:-7])
    elif damage == "garbage":
        path.write_bytes(b"\x00\xff" * 300)
    elif damage == "flip":  # the last float's bytes: the file still parses, only the checksum can tell
        path.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0x40]))
    elif damage == "foreign":
        from safetensors.numpy import save_file

        save_file({"features": fake(1)}, str(path), {"format": "reb-dist-model/1"})
    elif damage == "other_key":
        cache.store(key_of(2), fake(2))
        shutil.copyfile(cache.path(key_of(2)), path)
    else:
        path.write_bytes(b"")
    assert cache.lookup(key_of(1)) is None
    assert not path.exists()
    cache.store(key_of(1), fake(1))  # and it is simply written again
    assert np.array_equal(cache.lookup(key_of(1)), fake(1))


def test_a_corrupt_file_is_recomputed_in_a_run(backbone, images, cache, forwards):
    reference = extract(make_detector(backbone), images, cache)
    path = cache.path(cache.key(extraction_settings(make_detector(backbone)), images[1].image_path))
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    forwards.clear()
    again = extract(make_detector(backbone), images, cache)
    assert sum(forwards) == 1 and np.array_equal(again[[0, 2, 3]], reference[[0, 2, 3]])
    # image 1 was extracted alone this time: CPU kernels round a batch of 1 and a batch of 4 apart
    alone = extract_samples(make_detector(backbone), images[1:2], RunConfig().data, "alone")[0][0]
    assert np.array_equal(again[1], alone)
    np.testing.assert_allclose(again[1], reference[1], rtol=1e-5, atol=1e-4)
    assert np.array_equal(extract(make_detector(backbone), images, cache), again)  # and stored again


def test_files_carry_their_format_and_writes_leave_no_temporary_files(tmp_path):
    from safetensors import safe_open

    cache = FeatureCache(tmp_path, 10**9)
    cache.store(key_of(3), fake(3))
    with safe_open(str(cache.path(key_of(3))), framework="numpy") as f:
        assert f.metadata()["format"] == FEATURE_CACHE_FORMAT and f.metadata()["key"] == key_of(3)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [f"{key_of(3)}.safetensors"]


# --- settings and the command line


def test_the_default_folder_follows_xdg_cache_home_and_disabled_means_none(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_folder() == tmp_path / "xdg" / "reb-dist" / "features"
    assert FeatureCache.from_config(CacheConfig()).folder == default_folder()
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_folder() == Path.home() / ".cache" / "reb-dist" / "features"
    custom = FeatureCache.from_config(CacheConfig(dir=str(tmp_path / "c"), max_gb=0.5))
    assert custom.folder == tmp_path / "c" and custom.max_bytes == 512 * 1024**2
    assert FeatureCache.from_config(CacheConfig(enabled=False)) is None
    assert RunConfig.load(None, ["cache.max_gb=3"]).cache == CacheConfig(max_gb=3.0)


def test_the_suite_never_writes_to_the_users_cache():
    assert Path(os.environ["XDG_CACHE_HOME"]) != Path.home() / ".cache"
    assert not default_folder().is_relative_to(Path.home() / ".cache")


def test_reb_cache_info_and_clear(tmp_path, capsys):
    folder = tmp_path / "features"
    cache = FeatureCache(folder, 10**9)
    for i in range(2):
        cache.store(key_of(i), fake(i, (32, 32, 64)))
    assert main(["cache", "info", "--set", f"cache.dir={folder}"]) == 0
    out = capsys.readouterr().out
    assert str(folder) in out and "files: 2" in out and "GB" in out
    assert main(["cache", "clear", "--set", f"cache.dir={folder}"]) == 0
    assert "2 feature files deleted" in capsys.readouterr().out and cache.files() == []
    assert main(["cache", "info", "--set", f"cache.dir={folder}"]) == 0
    assert "files: 0" in capsys.readouterr().out
