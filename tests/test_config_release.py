"""MODEL.RELEASE presets the keys that make a model one CAT-Seg release or the other; each
preset key can still be set in the file or as an override; official CVPR'24 files get the
cvpr24 preset; one shipped_config lookup serves every entry point."""
import pytest

from catseg.config import RELEASES, load_config, shipped_config
from catseg.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("release", ["v1", "cvpr24"])
def test_release_in_the_file_presets_its_keys(tmp_path, release):
    cfg = load_config(write(tmp_path, f"_BASE_: tiny.yaml\nMODEL:\n  RELEASE: {release}\n"))
    assert cfg.MODEL.RELEASE == release
    for key, value in RELEASES[release].items():
        assert cfg.MODEL.SEM_SEG_HEAD[key] == value, key


def test_preset_keys_stay_overridable(tmp_path):
    path = write(tmp_path, "_BASE_: tiny.yaml\nMODEL:\n  RELEASE: cvpr24\n  SEM_SEG_HEAD:\n"
                           "    TEXT_SYNONYMS: average\n")
    cfg = load_config(path, ["MODEL.SEM_SEG_HEAD.CLASS_PAD_LENGTH", "64"])
    head = cfg.MODEL.SEM_SEG_HEAD
    assert head.TEXT_SYNONYMS == "average" and head.CLASS_PAD_LENGTH == 64  # the file and the override win
    assert head.GUIDANCE_SOURCE == "clip" and head.CLIP_ATTN_WEIGHTS == "split"  # the rest of the preset


def test_release_as_an_override(tmp_path):
    cfg = load_config(shipped_config("tiny.yaml"), ["MODEL.RELEASE", "cvpr24"])
    assert cfg.MODEL.RELEASE == "cvpr24" and cfg.MODEL.SEM_SEG_HEAD.CLIP_DENSE_BLOCK == "cvpr24"
    assert load_config(shipped_config("tiny.yaml")).MODEL.RELEASE == "v1"


def test_unknown_release_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="MODEL.RELEASE 'v3'"):
        load_config(shipped_config("tiny.yaml"), ["MODEL.RELEASE", "v3"])


def test_shipped_cvpr24_configs_name_their_release():
    for name in ("cvpr24/vitl_336.yaml", "cvpr24/vitb_384.yaml", "cvpr24/ade150.yaml", "cvpr24/tiny_b.yaml"):
        assert load_config(shipped_config(name)).MODEL.RELEASE == "cvpr24", name
    assert load_config(shipped_config("vitl_swinb_384.yaml")).MODEL.RELEASE == "v1"


def test_official_cvpr24_file_gets_the_preset(shared):
    cfg = load_config(shared / "reference" / "official_configs" / "cvpr24" / "vitl_336.yaml")
    assert cfg.MODEL.RELEASE == "cvpr24"
    assert cfg.MODEL.SEM_SEG_HEAD.GUIDANCE_SOURCE == "clip" and cfg.MODEL.SEM_SEG_HEAD.CLIP_FINETUNE == "qv"


def test_shipped_config_names_a_missing_one():
    assert shipped_config("tiny.yaml").is_file()
    with pytest.raises(ConfigError, match="no shipped config nope.yaml"):
        shipped_config("nope.yaml")
