"""Official CAT-Seg config files load unchanged and build the model of our config of that variant.

For every official v1 file: its built model's state_dict manifest equals the official one, and
every config value equals our config's, except the values listed in NO_EFFECT (each with why
it changes nothing here) and the ones compared by effect (class lists by their names, pooling
by what training and inference use). The benchmark files are compared with the official
`eval.sh` overrides applied, against our benchmark configs. CVPR'24 files: recognised as
CVPR'24 files, they build the official CVPR'24 manifests, and every value that the CVPR'24
model reads equals our configs/cvpr24 file's.
"""
import pytest
import torch
from detectron2.modeling import build_model
from helpers import CONFIGS
from test_model import read_tsv

from catseg.config import load_config
from catseg.config.loader import is_official_cvpr24_file
from catseg.data.class_names import load_class_names

RANDOM_CLIP = ["MODEL.SEM_SEG_HEAD.CLIP_WEIGHTS", "random", "MODEL.DEVICE", "cpu"]

# official eval.sh overrides per benchmark file: (class list, dataset)
EVAL_SH = {"ade150": ("ade150", "ade20k_150_test_sem_seg"), "ade847": ("ade847", "ade20k_full_sem_seg_freq_val_all"),
           "pas20": ("voc20", "voc_2012_test_sem_seg"), "pas20b": ("voc20b", "voc_2012_test_background_sem_seg"),
           "pas59": ("pc59", "context_59_test_sem_seg"), "pas459": ("pc459", "context_459_test_sem_seg")}

# value -> why it changes nothing here
NO_EFFECT = {
    "CUDNN_BENCHMARK": "cuDNN algorithm search: speed only",
    "DATALOADER.NUM_WORKERS": "loader processes: speed only",
    "MODEL.SEM_SEG_HEAD.IN_FEATURES": ("read neither by catseg nor by the official head "
                                       "(the head takes the backbone's OUT_FEATURES)"),
    "MODEL.WEIGHTS": "initial weights: the official backbone .pkl vs MODEL.BACKBONE.PRETRAINED (same ImageNet weights)",
    "MODEL.BACKBONE.PRETRAINED": "catseg's name of the ImageNet weights the official files give in MODEL.WEIGHTS",
}
BY_EFFECT = {"MODEL.SEM_SEG_HEAD.TRAIN_CLASS_JSON", "MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON",
             "MODEL.SEM_SEG_HEAD.POOLING_SIZES", "TEST.POOLING_SIZES"}


def official_cases():
    cases = [("v1/vitl_swinb_384.yaml", "vitl_swinb_384.yaml", []), ("v1/vitb_r101_384.yaml", "vitb_r101_384.yaml", [])]
    for bench, (classes, dataset) in EVAL_SH.items():
        opts = ["MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON", f"datasets/{classes}.json", "DATASETS.TEST", f'("{dataset}",)',
                "TEST.SLIDING_WINDOW", "True", "MODEL.SEM_SEG_HEAD.POOLING_SIZES", "[1,1]"]
        cases.append((f"v1/vitl_swinb_384_{bench}.yaml", f"{classes}.yaml", opts))
    return cases


def flatten(node, prefix=""):
    out = {}
    for key, value in node.items():
        if hasattr(value, "items"):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def effects(cfg, training: bool):
    """Values compared by what they do: class names, pooling in training / inference."""
    head = cfg.MODEL.SEM_SEG_HEAD
    out = {"test classes": load_class_names(head.TEST_CLASS_JSON),
           "inference pooling": list(cfg.TEST.POOLING_SIZES or head.POOLING_SIZES)}
    if training:
        out.update({"train classes": load_class_names(head.TRAIN_CLASS_JSON),
                    "train pooling": list(head.POOLING_SIZES)})
    return out


def irrelevant_sections(cfg):
    """Sections of backbones the config does not build."""
    sections = {"D2SwinTransformer": "MODEL.SWIN.", "build_resnet_backbone": "MODEL.RESNETS."}
    return tuple(s for name, s in sections.items() if name != cfg.MODEL.BACKBONE.NAME)


@pytest.mark.parametrize("official,ours,opts", official_cases(), ids=lambda x: x if isinstance(x, str) else "")
def test_official_v1_file_equals_our_config(shared, official, ours, opts):
    theirs = load_config(shared / "reference" / "official_configs" / official, opts)
    mine = load_config(CONFIGS / ours)
    a, b = flatten(theirs), flatten(mine)
    skip = irrelevant_sections(mine)
    differ = {k: (a.get(k), b.get(k)) for k in set(a) | set(b)
              if a.get(k) != b.get(k) and k not in NO_EFFECT and k not in BY_EFFECT and not k.startswith(skip)}
    assert differ == {}
    training = not opts
    assert effects(theirs, training) == effects(mine, training)
    assert theirs.MODEL.SEM_SEG_HEAD.PROMPT_ENSEMBLE_TYPE == "imagenet"  # read from MODEL.PROMPT_ENSEMBLE_TYPE


@pytest.mark.parametrize("official,tsv", [("v1/vitl_swinb_384.yaml", "vitl_swinb_384.tsv"),
                                          ("v1/vitb_r101_384.yaml", "vitb_r101_384.tsv")])
def test_official_v1_file_builds_official_manifest(shared, official, tsv):
    """Built from the official file with a random CLIP (no download); MODEL.WEIGHTS is not read
    when building, so the official .pkl names need no override."""
    torch.manual_seed(0)
    model = build_model(load_config(shared / "reference" / "official_configs" / official, RANDOM_CLIP))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == read_tsv(shared / "reference" / "official_v1_state_dict" / tsv)


def test_benchmark_files_build_the_base_model(shared):
    """The six benchmark files differ from the L file only in their test classes and dataset, so
    they build the L model whose manifest is checked above."""
    folder = shared / "reference" / "official_configs" / "v1"
    base = flatten(load_config(folder / "vitl_swinb_384.yaml").MODEL)
    for bench in EVAL_SH:
        model_keys = flatten(load_config(folder / f"vitl_swinb_384_{bench}.yaml").MODEL)
        assert {k for k in base if base[k] != model_keys[k]} == {"SEM_SEG_HEAD.TEST_CLASS_JSON"}


def test_official_place_wins_and_maps(shared):
    cfg = load_config(CONFIGS / "tiny.yaml", ["MODEL.PROMPT_ENSEMBLE_TYPE", "single",
                                              "MODEL.CLIP_PIXEL_MEAN", "[1.0, 2.0, 3.0]"])
    assert cfg.MODEL.SEM_SEG_HEAD.PROMPT_ENSEMBLE_TYPE == "single"
    assert cfg.MODEL.SEM_SEG_HEAD.CLIP_PIXEL_MEAN == [1.0, 2.0, 3.0]
    assert cfg.MODEL.PROMPT_ENSEMBLE_TYPE == "" and cfg.MODEL.CLIP_PIXEL_MEAN == []
    model = build_model(load_config(cfg, ["MODEL.DEVICE", "cpu"]))
    assert model.sem_seg_head.predictor.prompt_templates == ["A photo of a {} in the scene"]
    assert model.clip_pixel_mean.flatten().tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("name", ["vitb_384.yaml", "vitl_336.yaml"])
def test_official_cvpr24_files_load_and_are_recognised(shared, name):
    path = shared / "reference" / "official_configs" / "cvpr24" / name
    cfg = load_config(path)
    assert cfg.MODEL.SEM_SEG_HEAD.PROMPT_ENSEMBLE_TYPE == "single"
    assert is_official_cvpr24_file(str(path))


@pytest.mark.parametrize("name", ["vitb_384.yaml", "vitl_336.yaml"])
def test_official_cvpr24_file_builds_official_manifest_and_equals_our_config(shared, name):
    path = shared / "reference" / "official_configs" / "cvpr24" / name
    theirs, mine = load_config(path), load_config(CONFIGS / "cvpr24" / name)
    # The CVPR'24 model builds no backbone and ignores the backbone's pixel statistics.
    unread = ("MODEL.BACKBONE.", "MODEL.SWIN.", "MODEL.RESNETS.", "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD")
    a, b = flatten(theirs), flatten(mine)
    differ = {k: (a.get(k), b.get(k)) for k in set(a) | set(b)
              if a.get(k) != b.get(k) and k not in NO_EFFECT and k not in BY_EFFECT and not k.startswith(unread)}
    assert differ == {}
    assert effects(theirs, True) == effects(mine, True)
    torch.manual_seed(0)
    model = build_model(load_config(path, RANDOM_CLIP))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == read_tsv(shared / "reference" / "official_cvpr24_state_dict" / name.replace(".yaml", ".tsv"))


def test_official_cvpr24_base_loads(shared):
    """config.yaml is a _BASE_ only (80 templates, 4 layers: both overridden by the model files)."""
    path = shared / "reference" / "official_configs" / "cvpr24" / "config.yaml"
    assert load_config(path).MODEL.SEM_SEG_HEAD.NUM_LAYERS == 4
    assert not is_official_cvpr24_file(str(path))


def test_v1_and_our_files_are_not_cvpr24(shared):
    v1 = sorted((shared / "reference" / "official_configs" / "v1").glob("*.yaml"))
    assert len(v1) == 9 and not any(is_official_cvpr24_file(str(p)) for p in v1)
    assert load_config(v1[0]) is not None  # v1/config.yaml (a _BASE_ only) loads as well
    assert not any(is_official_cvpr24_file(str(p)) for p in CONFIGS.glob("*.yaml"))
