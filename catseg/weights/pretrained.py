"""ImageNet weights named by MODEL.BACKBONE.PRETRAINED: downloaded on first use, cached, loaded
when training starts from scratch.

Sources:
- "timm:ARCH.TAG" (e.g. "timm:swin_base_patch4_window12_384.ms_in22k"): timm's file on the
  Hugging Face hub, cached by huggingface_hub (~/.cache/huggingface, $HF_HOME);
- "torchvision:ARCH.WEIGHTS" (e.g. "torchvision:resnet101.IMAGENET1K_V1"): torchvision's URL,
  cached in torch hub's checkpoints folder (~/.cache/torch/hub/checkpoints, $TORCH_HOME);
- anything else: a local file (any layout MODEL.WEIGHTS accepts).
The file is loaded through the checkpointer, which converts it to the backbone's key names
(catseg/weights/convert.py). Without network, `resolve_pretrained` raises a one-line
`PretrainedWeightsError` saying which file to download and where to put it.
"""
import os
import socket
from typing import Tuple

from ..errors import WeightsError

# Official CAT-Seg backbone files (MODEL.WEIGHTS of the official configs) -> the same ImageNet
# weights as a source here.
OFFICIAL_BACKBONE_FILES = {
    "swin_base_patch4_window12_384_22k.pkl": "timm:swin_base_patch4_window12_384.ms_in22k",
    "swin_large_patch4_window12_384_22k.pkl": "timm:swin_large_patch4_window12_384.ms_in22k",
    "R-101.pkl": "torchvision:resnet101.IMAGENET1K_V1",
}
DOWNLOAD_TIMEOUT_S = 60  # per network operation of a torchvision download


class PretrainedWeightsError(WeightsError):
    """Backbone weights cannot be found or downloaded; the message says what to do (one line)."""


def initial_backbone_source(cfg, resuming: bool) -> str:
    """MODEL.BACKBONE.PRETRAINED when training starts from it (a backbone guidance source, no
    checkpoint to resume, no MODEL.WEIGHTS); "" otherwise."""
    if resuming or cfg.MODEL.WEIGHTS or cfg.MODEL.SEM_SEG_HEAD.GUIDANCE_SOURCE != "backbone":
        return ""
    return cfg.MODEL.BACKBONE.PRETRAINED


def timm_location(name: str) -> Tuple[str, str]:
    """(hub repository, download URL) of timm's pretrained `name` ("arch.tag")."""
    from timm.models import get_pretrained_cfg

    pretrained = get_pretrained_cfg(name)
    if pretrained is None or not pretrained.hf_hub_id:
        raise PretrainedWeightsError(f"timm has no pretrained weights named {name!r} (MODEL.BACKBONE.PRETRAINED)")
    repo = pretrained.hf_hub_id
    return repo, f"https://huggingface.co/{repo}/resolve/main/model.safetensors"


def torchvision_location(name: str) -> Tuple[str, str]:
    """(download URL, cache path) of torchvision's `name` ("arch.WEIGHTS", default weights if no tag)."""
    import torch
    from torchvision.models import get_model_weights

    arch, _, tag = name.partition(".")
    try:
        url = get_model_weights(arch)[tag or "DEFAULT"].url
    except (KeyError, ValueError):
        raise PretrainedWeightsError(f"torchvision has no weights {name!r} (MODEL.BACKBONE.PRETRAINED)") from None
    return url, os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def fetch_timm(name: str) -> str:
    from huggingface_hub import hf_hub_download

    repo, url = timm_location(name)
    try:
        return hf_hub_download(repo, "model.safetensors")
    except Exception as e:  # offline, unreachable, not cached: all end the same way
        raise PretrainedWeightsError(
            f"cannot download the backbone weights {url} ({type(e).__name__}): download that file and "
            f"set MODEL.WEIGHTS to its path (or MODEL.BACKBONE.PRETRAINED to it)") from None


def fetch_torchvision(name: str) -> str:
    from torch.hub import download_url_to_file

    url, path = torchvision_location(name)
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        download_url_to_file(url, path, progress=False)
    except Exception as e:
        raise PretrainedWeightsError(
            f"cannot download the backbone weights {url} ({type(e).__name__}): download that file and "
            f"put it at {path} (or set MODEL.WEIGHTS to its path)") from None
    finally:
        socket.setdefaulttimeout(previous)
    return path


def resolve_pretrained(source: str) -> str:
    """Local file of `source` (see the module docstring), downloading it on first use."""
    kind, _, name = source.partition(":")
    if kind == "timm":
        return fetch_timm(name)
    if kind == "torchvision":
        return fetch_torchvision(name)
    if not os.path.isfile(source):
        raise PretrainedWeightsError(f"backbone weights {source} not found (MODEL.BACKBONE.PRETRAINED)")
    return source


def check_weights_file(path: str) -> None:
    """One-line error for a local MODEL.WEIGHTS file that does not exist (URLs and detectron2
    catalog paths pass); official backbone file names get the source that provides them."""
    if not path or "://" in path or os.path.isfile(path):
        return
    hint = ""
    source = OFFICIAL_BACKBONE_FILES.get(os.path.basename(path))
    if source:
        hint = f"; or download the same ImageNet weights with MODEL.WEIGHTS \"\" MODEL.BACKBONE.PRETRAINED {source}"
    raise PretrainedWeightsError(f"weights file {path} not found (MODEL.WEIGHTS){hint}")
