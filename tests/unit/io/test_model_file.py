"""Model files: a fitted detector round-trips exactly; a wrong, foreign, broken or missing file is a clear error."""

from __future__ import annotations
import json
import re
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from reb_dist.io.model_file import MODEL_FORMAT, load_model, save_model
from reb_dist.errors import ModelFileError
from reb_dist.pipelines.evaluate import load_category, loader


def _rewrite(src, dst, **meta_changes):
    with safe_open(str(src), framework="numpy") as f:
        meta = dict(f.metadata())
    meta.update(meta_changes)
    save_file(load_file(str(src)), str(dst), meta)
    return dst


def test_save_load_round_trip(cfg, detector, test_features, saved):
    folder, path = saved
    assert sorted(folder.iterdir()) == [path]  # the atomic write left no temp file behind

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
        assert set(f.keys()) == {"bank", "density", "bank_source"}  # where each bank row came from
    assert meta["format"] == MODEL_FORMAT == "reb-dist-model/1"
    assert meta["backbone_fingerprint"] == detector.backbone.fingerprint
    assert json.loads(meta["backbone"])["name"] == "efficientnet_lite0"
    assert json.loads(meta["scoring"])["k"] == cfg.scoring.k
    assert meta["image_size"] == "256"

    loaded = load_model(path, device="cpu")
    assert loaded.backbone.fingerprint == detector.backbone.fingerprint
    np.testing.assert_array_equal(loaded.bank, detector.bank)
    np.testing.assert_array_equal(loaded.bank_source, detector.bank_source)
    assert loaded.train_images == detector.train_images and loaded.feature_grid == detector.feature_grid == (32, 32)

    # The stored densities are used as they are: no neighbour search may run to recompute them.
    def no_search(*args, **kwargs):
        raise AssertionError("density recomputed instead of read from the model file")

    loaded.scorer.stats.neighbours = no_search
    expected_density = detector.compute_density()
    np.testing.assert_allclose(loaded.scorer.stats.local_density(cfg.scoring.k, cfg.scoring.squared),
                               expected_density, rtol=1e-6, atol=0)
    np.testing.assert_allclose(load_file(str(path))["density"], expected_density, rtol=0, atol=0)
    del loaded.scorer.stats.neighbours

    methods = detector.methods()
    subset = test_features[::3]  # 3 defective, 2 good bottles: each search is over 16384 patches
    before = detector.score_features(subset, methods)
    after = loaded.score_features(subset, loaded.methods())
    assert [m.label for m in after] == [m.label for m in before]
    for (m, a), b in zip(before.items(), after.values()):
        np.testing.assert_allclose(b.patch_maps, a.patch_maps, rtol=1e-6, atol=1e-6, err_msg=m.label)
        np.testing.assert_allclose(b.image_scores, a.image_scores, rtol=1e-6, atol=1e-6, err_msg=m.label)

    # the loaded detector also extracts the same features (same backbone, aggregation, image size)
    two = next(iter(loader(load_category(cfg.data, "bottle").test[:2], cfg.data)))
    np.testing.assert_allclose(loaded.extract([two]), test_features[:2], rtol=1e-4, atol=1e-4)


def test_model_with_another_backbone_fingerprint_is_refused(saved, tmp_path, detector):
    _, path = saved
    tampered = _rewrite(path, tmp_path / "tampered.safetensors", backbone_fingerprint="deadbeefdeadbeef")
    with pytest.raises(ModelFileError) as exc:
        load_model(tampered, device="cpu")
    message = str(exc.value)
    assert str(tampered) in message
    assert "deadbeefdeadbeef" in message  # the fingerprint the model was fitted with
    assert detector.backbone.fingerprint in message  # and the one found now


def test_model_of_another_format_is_refused(saved, tmp_path):
    _, path = saved
    other = _rewrite(path, tmp_path / "other.safetensors", format="something-else/2")
    with pytest.raises(ModelFileError, match="format"):
        load_model(other, device="cpu")


def test_truncated_corrupt_or_missing_model_file(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=re.escape(str(truncated))):
        load_model(truncated, device="cpu")

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a model" * 10)
    with pytest.raises(ModelFileError, match=re.escape(str(garbage))):
        load_model(garbage, device="cpu")

    missing = tmp_path / "missing.safetensors"
    with pytest.raises(ModelFileError, match=re.escape(str(missing))):
        load_model(missing, device="cpu")


def test_model_with_incompatible_settings_is_a_model_file_error(saved, tmp_path):
    _, path = saved
    bad = _rewrite(path, tmp_path / "bad.safetensors", backbone='{"name": "efficientnet_lite0", "nope": 1}')
    with pytest.raises(ModelFileError, match=re.escape(str(bad))):
        load_model(bad, device="cpu")


def test_a_detector_made_without_its_settings_is_refused_before_anything_is_written(detector, tmp_path):
    from reb_dist.core.detector import Detector

    bare = Detector(detector.backbone, detector.scoring, device="cpu")  # no settings: nothing to rebuild it from
    bare.set_bank(detector.bank[:64])
    with pytest.raises(RuntimeError, match="build_detector"):
        save_model(bare, tmp_path / "bare.safetensors")
    assert not (tmp_path / "bare.safetensors").exists()


def _edit(src, dst, tensors=None, **meta_changes):
    """A copy of a model file with metadata and tensors changed and its settings digest made to match
    (as a tool that rewrites files would), so the loader's own checks are what refuses it."""
    from reb_dist.io.model_file import settings_digest

    with safe_open(str(src), framework="numpy") as f:
        meta = dict(f.metadata())
    meta.update(meta_changes)
    meta["settings_sha256"] = settings_digest(meta)
    save_file({**load_file(str(src)), **(tensors or {})}, str(dst), meta)
    return dst


def test_a_model_files_settings_and_tensors_are_checked_as_a_command_lines_are(saved, tmp_path):
    _, path = saved
    scoring = json.loads(load_file_meta(path)["scoring"])
    bank = load_file(str(path))["bank"]
    density = load_file(str(path))["density"]
    nan_bank = bank.copy()
    nan_bank[3] = np.nan
    cases = {
        "alpha_nan": ({"scoring": json.dumps({**scoring, "alpha": float("nan")})}, None, "scoring.alpha=nan"),
        "alpha_huge": ({"scoring": json.dumps({**scoring, "alpha": 1e308})}, None, "scoring.alpha=1e+308"),
        "unknown_method": ({"scoring": json.dumps({**scoring, "methods": ["patchcore"]})}, None, "'patchcore'"),
        "negative_density": ({}, {"density": np.full_like(density, -1e30)}, "density holds negative values"),
        "nan_bank": ({}, {"bank": nan_bank}, f"bank holds {bank.shape[1]} values that are not finite"),
    }
    for name, (meta, tensors, says) in cases.items():
        bad = _edit(path, tmp_path / f"{name}.safetensors", tensors, **meta)
        with pytest.raises(ModelFileError) as exc:
            load_model(bad, device="cpu")
        assert str(bad) in str(exc.value) and says in str(exc.value), (name, str(exc.value))


def test_a_model_whose_settings_were_edited_after_saving_is_refused(saved, tmp_path):
    _, path = saved
    edited = _rewrite(path, tmp_path / "edited.safetensors", image_size="128")  # once: scored at 128 px
    with pytest.raises(ModelFileError, match=re.escape(f"{edited}: its settings")):
        load_model(edited, device="cpu")
    assert load_model(_rewrite(path, tmp_path / "same.safetensors"), device="cpu").image_size == 256


def load_file_meta(path):
    with safe_open(str(path), framework="numpy") as f:
        return dict(f.metadata())


@pytest.mark.parametrize("change", [{"feature_grid": "[32]"}, {"train_images": "{}"}, {"train_images": "[]"}])
def test_a_malformed_bank_provenance_names_the_file(saved, tmp_path, change):
    _, path = saved
    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata())
    broken = tmp_path / "broken.safetensors"
    save_file(load_file(str(path)), str(broken), {**meta, **change})
    with pytest.raises(ModelFileError, match=r"broken\.safetensors: malformed bank provenance"):
        load_model(broken, device="cpu")
