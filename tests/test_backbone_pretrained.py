"""Training starts the guidance backbone from MODEL.BACKBONE.PRETRAINED: a one-line error without
network, the backbone keys loaded (and reported) from a local file, no download for evaluation."""
import logging
import urllib.error

import pytest
import torch
from helpers import make_cfg
from timm.models.swin_transformer import SwinTransformer
from train_helpers import mini_quickstart, quickstart_cfg, run_train_net

from catseg.engine import CATSegTrainer
from catseg.weights import pretrained
from catseg.weights.convert import swin_from_timm
from catseg.weights.pretrained import PretrainedWeightsError, check_weights_file, resolve_pretrained


def test_training_without_network_fails_at_once_with_one_line(tmp_path):
    proc = run_train_net(["--config-file", "configs/ade150.yaml", "OUTPUT_DIR", str(tmp_path / "out")],
                         HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), DETECTRON2_DATASETS=str(tmp_path / "none"))
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    url = "https://huggingface.co/timm/swin_base_patch4_window12_384.ms_in22k/resolve/main/model.safetensors"
    assert lines[-1].startswith(f"error: cannot download the backbone weights {url} (")
    assert "set MODEL.WEIGHTS to its path" in lines[-1]
    assert not (tmp_path / "out").exists()  # nothing built, nothing started


def test_torchvision_offline_message_names_url_and_cache_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, dst, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torch.hub.download_url_to_file", offline)
    cache = tmp_path / "torch" / "hub" / "checkpoints" / "resnet101-63fe2227.pth"
    with pytest.raises(PretrainedWeightsError) as err:
        resolve_pretrained("torchvision:resnet101.IMAGENET1K_V1")
    assert "https://download.pytorch.org/models/resnet101-63fe2227.pth" in str(err.value)
    assert f"put it at {cache}" in str(err.value) and "\n" not in str(err.value)
    cache.write_bytes(b"")  # once the file is there, no download is tried
    assert resolve_pretrained("torchvision:resnet101.IMAGENET1K_V1") == str(cache)


def test_official_backbone_file_names_get_a_hint(tmp_path):
    with pytest.raises(PretrainedWeightsError,
                       match="MODEL.BACKBONE.PRETRAINED timm:swin_base_patch4_window12_384.ms_in22k"):
        check_weights_file("swin_base_patch4_window12_384_22k.pkl")
    with pytest.raises(PretrainedWeightsError, match=r"weights file nothing.pth not found \(MODEL.WEIGHTS\)$"):
        check_weights_file("nothing.pth")
    check_weights_file("")


def test_training_starts_from_a_local_backbone_file(tmp_path, caplog):
    """Tiny quick-start Swin initialised from a timm-layout file, then two training iterations."""
    torch.manual_seed(0)
    timm_swin = SwinTransformer(img_size=128, embed_dim=32, depths=(1, 1, 2), num_heads=(1, 2, 4), window_size=8)
    path = tmp_path / "tiny_swin_timm.pth"
    torch.save(timm_swin.state_dict(), path)
    data = mini_quickstart(tmp_path / "qs", train=2, val=1)
    cfg = quickstart_cfg(data, tmp_path / "out", SOLVER__MAX_ITER=2, SOLVER__IMS_PER_BATCH=2, DATASETS__TEST="()",
                         MODEL__BACKBONE__PRETRAINED=str(path))
    trainer = CATSegTrainer(cfg)
    with caplog.at_level(logging.INFO):
        trainer.resume_or_load(resume=False)
    assert f"Backbone initialised from {path} (timm Swin layout): " in caplog.text
    loaded = caplog.text.split("(timm Swin layout): ")[1].split(" backbone tensors loaded")[0].split(" of ")
    assert loaded[0] == loaded[1]
    own = trainer.model.backbone.state_dict()
    for key, value in swin_from_timm(timm_swin.state_dict()).items():
        if key in own:
            torch.testing.assert_close(own[key], value, atol=0, rtol=0)
    trainer.train()
    assert trainer.iter == 2 and (tmp_path / "out" / "model_final.pth").is_file()


def test_evaluation_and_resume_need_no_backbone_weights():
    cfg = make_cfg("vitl_swinb_384.yaml")
    assert pretrained.initial_backbone_source(cfg, resuming=False) == "timm:swin_base_patch4_window12_384.ms_in22k"
    assert pretrained.initial_backbone_source(cfg, resuming=True) == ""
    cfg.MODEL.WEIGHTS = "model_final.pth"
    assert pretrained.initial_backbone_source(cfg, resuming=False) == ""
