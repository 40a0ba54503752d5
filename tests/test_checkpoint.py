"""Checkpoints: official-format loading with one mismatch report, strict mode, atomic saves."""
import os

import pytest
import torch
from helpers import make_model

from catseg.weights.checkpointer import (
    CATSegCheckpointer,
    CheckpointMismatchError,
    CheckpointReleaseError,
    format_mismatch_report,
)


@pytest.fixture(scope="module")
def model():
    return make_model()


def _official_file(tmp_path, state_dict):
    path = tmp_path / "official.pth"
    torch.save({"model": state_dict}, path)
    return str(path)


def test_official_format_loads_with_no_mismatch(model, tmp_path, caplog):
    state = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    target = make_model(seed=1)
    with caplog.at_level("INFO"):
        CATSegCheckpointer(target, strict=True).load(_official_file(tmp_path, state))
    assert "all keys match (0 missing, 0 unexpected)" in caplog.text
    for k, v in target.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_wrong_and_missing_keys_give_one_readable_report(model, tmp_path, caplog):
    state = dict(model.state_dict())
    state.pop("sem_seg_head.predictor.transformer.conv1.weight")
    state.pop("sem_seg_head.predictor.transformer.conv1.bias")
    state["sem_seg_head.predictor.typo.weight"] = torch.zeros(2)
    key = "sem_seg_head.predictor.transformer.head.weight"
    state[key] = torch.zeros(1, 2, 3, 3)
    path = _official_file(tmp_path, state)
    with caplog.at_level("WARNING"):
        CATSegCheckpointer(make_model(), strict=False).load(path)
    reports = [r.getMessage() for r in caplog.records if "does not match the model" in r.getMessage()]
    assert len(reports) == 1, "one summary, not one message per key"
    report = reports[0]
    assert "2 missing, 1 unexpected, 1 wrong-shape keys" in report.splitlines()[0]
    assert "sem_seg_head.predictor.transformer.conv1.{bias, weight}" in report
    assert "sem_seg_head.predictor.typo.weight" in report
    assert f"{key}: (1, 2, 3, 3) vs" in report
    assert "MODEL.CHECKPOINT_STRICT" in report


def test_strict_raises_the_report(model, tmp_path):
    state = dict(model.state_dict())
    state.pop("sem_seg_head.predictor.transformer.conv1.bias")
    with pytest.raises(CheckpointMismatchError, match="1 missing, 0 unexpected"):
        CATSegCheckpointer(make_model(), strict=True).load(_official_file(tmp_path, state))


def test_report_is_empty_when_everything_matches():
    assert format_mismatch_report("x", [], [], []) == ""


def test_crash_during_save_keeps_previous_checkpoint(model, tmp_path, monkeypatch):
    ckpt = CATSegCheckpointer(model, save_dir=str(tmp_path))
    ckpt.save("model_0000009")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes of a checkpoint")  # the process dies mid-write
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(torch, "save", dying_save)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_0000019")
    monkeypatch.undo()

    assert not (tmp_path / "model_0000019.pth").exists()
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000009.pth"], "no temp files left"
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    fresh = make_model(seed=3)
    loader = CATSegCheckpointer(fresh, save_dir=str(tmp_path), strict=True)
    assert loader.get_checkpoint_file().endswith("model_0000009.pth")
    loader.resume_or_load("", resume=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_crash_while_tagging_keeps_old_tag(model, tmp_path, monkeypatch):
    ckpt = CATSegCheckpointer(model, save_dir=str(tmp_path))
    ckpt.save("model_a")
    real_replace = os.replace

    def failing_replace(src, dst):
        if dst.endswith("last_checkpoint"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        ckpt.save("model_b")
    monkeypatch.undo()
    assert (tmp_path / "last_checkpoint").read_text() == "model_a.pth"
    torch.load(tmp_path / "model_b.pth", weights_only=False)  # complete file, just not tagged


@pytest.mark.parametrize("model_config,checkpoint_config,release,hint", [
    ("tiny.yaml", "cvpr24/tiny_b.yaml", "CVPR'24", "configs/cvpr24/vitl_336.yaml"),
    ("cvpr24/tiny_b.yaml", "tiny.yaml", "v1", "configs/vitl_swinb_384.yaml"),
])
def test_release_mix_up_is_one_line_naming_the_family(tmp_path, model_config, checkpoint_config, release, hint):
    """A v1 checkpoint with a CVPR'24 config (or the reverse): one line saying which config family
    the checkpoint belongs to, not a long mismatch report, strict or not."""
    path = _official_file(tmp_path, make_model(checkpoint_config).state_dict())
    for strict in (False, True):
        with pytest.raises(CheckpointReleaseError) as info:
            CATSegCheckpointer(make_model(model_config), strict=strict).load(path)
        message = str(info.value)
        assert "\n" not in message
        assert f"is a CAT-Seg {release} checkpoint" in message and hint in message
