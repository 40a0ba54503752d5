"""Building a model straight from its checkpoint (catseg/modeling/build.py) gives exactly the
model that build-then-load gives, without creating the checkpoint's large tensors twice."""
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model

from catseg.config import load_config
from catseg.modeling.build import META_MIN_NUMEL, LargeTensorsOnMeta, build_from_checkpoint
from catseg.weights.checkpointer import CATSegCheckpointer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_large_factory_calls_go_to_meta():
    with LargeTensorsOnMeta():
        big, small = torch.empty(META_MIN_NUMEL), torch.zeros(4, 4)
        big2, arange = torch.randn((256, 256)), torch.arange(10)
        linear = torch.nn.Linear(512, 512)
    assert big.is_meta and big2.is_meta and linear.weight.is_meta
    assert not small.is_meta and not arange.is_meta and not linear.bias.is_meta


@pytest.mark.parametrize("config", ["tiny.yaml", "cvpr24/tiny_b.yaml"])
def test_same_model_as_build_then_load(tmp_path, config):
    cfg = load_config(str(CONFIGS / config), ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(11)
    saved = build_model(cfg)
    path = tmp_path / "model_final.pth"
    torch.save({"model": saved.state_dict(), "iteration": 3}, path)

    ordinary = build_model(cfg)
    CATSegCheckpointer(ordinary).load(str(path))
    cfg.MODEL.WEIGHTS = str(path)
    direct = build_from_checkpoint(cfg)
    assert not any(t.is_meta for t in list(direct.parameters()) + list(direct.buffers()))
    # every buffer, persistent or not (pixel statistics, index tables, masks), as built the ordinary way
    assert {n: b for n, b in direct.named_buffers()}.keys() == {n: b for n, b in ordinary.named_buffers()}.keys()
    for (name, a), (_, b) in zip(ordinary.named_buffers(), direct.named_buffers()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(ordinary.named_parameters(), direct.named_parameters()):
        assert torch.equal(a, b) and a.requires_grad == b.requires_grad, name
    # the large tensors were not created then overwritten: the model holds the file's (mapped) tensors
    big = [p for p in direct.parameters() if p.numel() >= META_MIN_NUMEL]
    assert big and all(not p.untyped_storage().resizable() for p in big)  # mmap-backed storages are fixed-size
    images = [{"image": torch.rand(3, 100, 140) * 255, "height": 100, "width": 140}]
    with torch.no_grad():
        assert torch.equal(ordinary.eval()(images)[0]["sem_seg"], direct.eval()(images)[0]["sem_seg"])


def test_partial_checkpoint_falls_back_to_build_then_load(tmp_path, caplog):
    """A checkpoint without some large tensor: built the ordinary way (random where it has nothing),
    with the usual mismatch report."""
    cfg = load_config(str(CONFIGS / "tiny.yaml"), ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(12)
    state = build_model(cfg).state_dict()
    dropped = next(k for k, v in state.items() if v.numel() >= META_MIN_NUMEL)
    path = tmp_path / "partial.pth"
    torch.save({"model": {k: v for k, v in state.items() if k != dropped}}, path)
    cfg.MODEL.WEIGHTS = str(path)
    with caplog.at_level("INFO"):
        model = build_from_checkpoint(cfg)
    assert not any(t.is_meta for t in model.parameters())
    assert f"has no tensor {dropped}" in caplog.text and "missing" in caplog.text
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items() if k != dropped)
