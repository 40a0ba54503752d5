"""ImageNet backbone checkpoints (timm Swin-B, torchvision ResNet-101, official detectron2 .pkl)
load into our guidance backbones through MODEL.WEIGHTS' loader and give the library's own
feature maps. No network: the library networks are randomly initialised and saved to disk."""
import logging
import pickle
import re

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from detectron2.modeling import build_backbone
from helpers import make_cfg
from safetensors.torch import save_file
from torch import nn

from catseg.weights.checkpointer import CATSegCheckpointer
from catseg.weights.convert import expected_keys, resnet_from_torchvision, swin_from_timm

SWIN_STAGES = {"res2": 0, "res3": 1, "res4": 2}


class Holder(nn.Module):
    """The part of CATSeg the checkpointer needs: a `backbone` attribute."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone


def load_into(backbone, path, caplog):
    """Load `path` like MODEL.WEIGHTS (strict: any missing / wrong-shape backbone key raises);
    returns the checkpointer's log."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fvcore.common.checkpoint"):
        CATSegCheckpointer(Holder(backbone)).load(str(path))
    return caplog.text


@pytest.fixture(scope="module")
def timm_swin():
    torch.manual_seed(0)
    return timm.create_model("swin_base_patch4_window12_384", pretrained=False).eval()


@pytest.fixture(scope="module")
def swin_input():
    return torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def timm_swin_features(timm_swin, swin_input):
    """timm's stage outputs (NCHW), layer-normalised over channels as the output norms of
    D2SwinTransformer do at initialisation (weight 1, bias 0)."""
    with torch.no_grad():
        maps = timm_swin.forward_intermediates(swin_input, indices=list(SWIN_STAGES.values()), norm=False,
                                               output_fmt="NCHW", intermediates_only=True)
    return {name: F.layer_norm(m.permute(0, 2, 3, 1), m.shape[1:2]).permute(0, 3, 1, 2)
            for name, m in zip(SWIN_STAGES, maps)}


@pytest.fixture(scope="module")
def d2_swin_b():
    """D2SwinTransformer of the L config; each test scrambles it first (see `scrambled`)."""
    return build_backbone(make_cfg("vitl_swinb_384.yaml")).eval()


def scrambled(backbone):
    """`backbone` with every loadable tensor overwritten by noise, so a load must replace it."""
    with torch.no_grad():
        for key in expected_keys(backbone):
            backbone.state_dict()[key].normal_()
    return backbone


def assert_holds(backbone, state):
    """Every tensor of `state` (backbone keys) equals the backbone's."""
    own = backbone.state_dict()
    for key, value in state.items():
        torch.testing.assert_close(own[key], torch.as_tensor(value), atol=0, rtol=0)


def assert_features_equal(backbone, x, expected):
    with torch.no_grad():
        out = backbone(x)
    for name, ref in expected.items():
        torch.testing.assert_close(out[name], ref, atol=1e-4, rtol=1e-4)


def test_timm_swin_b_loads_and_matches_timm(tmp_path, caplog, d2_swin_b, timm_swin, swin_input, timm_swin_features):
    path = tmp_path / "swin.pth"
    state = timm_swin.state_dict()
    torch.save(state, path)
    backbone = scrambled(d2_swin_b)
    log = load_into(backbone, path, caplog)
    loaded = re.search(r"\(timm Swin layout\): (\d+) of (\d+) backbone tensors loaded", log)
    assert loaded and loaded.group(1) == loaded.group(2)
    assert "kept at initialisation (in no ImageNet checkpoint): norm0.{bias, weight}, norm1.{bias, weight}, " \
           "norm2.{bias, weight}" in log  # detectron2's output norms
    # nothing missing, nothing unexpected; Swin-B's 4th stage (and the merge into it) and classifier unused
    assert f"Loaded {path}: all keys match (0 missing, 0 unexpected)" in log and "does not match" not in log
    n_surplus = sum(k.startswith(("layers.3.", "head.", "norm.")) for k in state)
    assert f"not used (classifier, stages after the last output): {n_surplus} tensors: head.fc.{{bias, weight}}" in log
    assert_features_equal(backbone, swin_input, timm_swin_features)


def test_timm_safetensors_loads(tmp_path, caplog, d2_swin_b, timm_swin):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in timm_swin.state_dict().items()}, str(path))
    log = load_into(scrambled(d2_swin_b), path, caplog)
    assert "(timm Swin layout)" in log and "missing (in the model" not in log
    assert_holds(d2_swin_b, {k: v for k, v in swin_from_timm(timm_swin.state_dict()).items()
                             if k in d2_swin_b.state_dict()})


def test_official_swin_pkl_loads(tmp_path, caplog, d2_swin_b, timm_swin):
    """The official swin_base_patch4_window12_384_22k.pkl layout: the original Swin keys as numpy
    arrays in a detectron2 model-zoo dict (the timm test shows these keys give timm's features)."""
    state = {k: v.numpy() for k, v in swin_from_timm(timm_swin.state_dict()).items()}
    check_pkl_loads(tmp_path / "swin_base_patch4_window12_384_22k.pkl", state, "third_party", d2_swin_b,
                    "detectron2 / original Swin layout", caplog)


def check_pkl_loads(path, state, author, model, layout, caplog):
    """`state` written as a detectron2 model-zoo .pkl loads into `model`, reported as `layout`."""
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": author, "matching_heuristics": True}, f)
    log = load_into(scrambled(model), path, caplog)
    assert f"({layout})" in log and "missing (in the model" not in log
    assert_holds(model, {k: v for k, v in state.items() if k in model.state_dict()})


@pytest.fixture(scope="module")
def torchvision_r101():
    torch.manual_seed(2)
    net = torchvision.models.resnet101()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
                m.weight.copy_(0.5 + 0.3 * torch.rand(m.num_features, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=gen))
    return net.eval()


@pytest.fixture(scope="module")
def r101_case(torchvision_r101):
    x = torch.randn(1, 3, 128, 160, generator=torch.Generator().manual_seed(4))
    net, feats = torchvision_r101, {}
    with torch.no_grad():
        y = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        for name, layer in (("res2", net.layer1), ("res3", net.layer2), ("res4", net.layer3)):
            y = layer(y)
            feats[name] = y
    return x, feats


@pytest.fixture(scope="module")
def d2_r101():
    return build_backbone(make_cfg("vitb_r101_384.yaml")).eval()


def test_torchvision_resnet101_loads_and_matches(tmp_path, caplog, d2_r101, torchvision_r101, r101_case):
    path = tmp_path / "resnet101.pth"
    torch.save(torchvision_r101.state_dict(), path)
    backbone = scrambled(d2_r101)
    log = load_into(backbone, path, caplog)
    assert "(torchvision ResNet layout)" in log and "all keys match (0 missing, 0 unexpected)" in log
    surplus = log.split("not used (classifier, stages after the last output): ")[1].splitlines()[0]
    assert "fc.{bias, weight}" in surplus and "res5." in surplus  # the classifier and layer4
    x, feats = r101_case
    assert_features_equal(backbone, x, feats)


def test_official_r101_pkl_loads(tmp_path, caplog, d2_r101, torchvision_r101):
    """The official R-101.pkl layout: torchvision's weights under detectron2 names, numpy arrays
    (the torchvision test shows these keys give torchvision's features)."""
    state = {k: v.numpy() for k, v in resnet_from_torchvision(torchvision_r101.state_dict()).items()}
    check_pkl_loads(tmp_path / "R-101.pkl", state, "torchvision", d2_r101, "detectron2 ResNet layout", caplog)


@pytest.mark.parametrize("config,prefix", [("backbones/tiny/vit.yaml", "vit."),
                                           ("backbones/tiny/twins_svt.yaml", "twins.")])
def test_timm_layout_of_wrapped_backbones_loads(tmp_path, caplog, config, prefix):
    """D2ViT / D2Twins: a checkpoint of the timm network alone (its own keys) loads under the prefix."""
    torch.manual_seed(0)
    backbone = build_backbone(make_cfg(config)).eval()
    state = {k[len(prefix):]: v.clone() for k, v in backbone.state_dict().items() if k.startswith(prefix)}
    torch.save(state, tmp_path / "timm.pth")
    log = load_into(scrambled(backbone), tmp_path / "timm.pth", caplog)
    assert "backbone tensors loaded" in log and "unexpected (in the checkpoint" not in log
    assert_holds(backbone, {prefix + k: v for k, v in state.items()})
