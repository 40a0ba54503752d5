"""CATSeg model: official state_dict layout, CLIP selection and fine-tuning, loss, batching."""
import pytest
import torch
import torch.nn.functional as F
from helpers import CONFIGS, make_model

from catseg.modeling import clip, text

RANDOM_CLIP = ["MODEL.SEM_SEG_HEAD.CLIP_WEIGHTS", "random"]


def read_tsv(path):
    shapes = {}
    for line in path.read_text().splitlines():
        key, shape = line.split("\t")
        shapes[key] = () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))
    return shapes


@pytest.mark.parametrize("config,tsv", [("vitb_r101_384.yaml", "official_v1_state_dict/vitb_r101_384.tsv"),
                                        ("vitl_swinb_384.yaml", "official_v1_state_dict/vitl_swinb_384.tsv"),
                                        ("cvpr24/vitb_384.yaml", "official_cvpr24_state_dict/vitb_384.tsv"),
                                        ("cvpr24/vitl_336.yaml", "official_cvpr24_state_dict/vitl_336.tsv")])
def test_state_dict_matches_official(shared, config, tsv):
    """Real-size v1 and CVPR'24 B / L architectures (random weights) have the official keys and shapes."""
    model = make_model(config, RANDOM_CLIP)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = read_tsv(shared / "reference" / tsv)
    assert sorted(set(official) - set(ours)) == []
    assert sorted(set(ours) - set(official)) == []
    assert {k: s for k, s in ours.items() if official[k] != s} == {}


@pytest.mark.parametrize("config", ["vith_swinb_384.yaml", "vitg_swinb_384.yaml"])
def test_huge_and_giant_state_dicts_match_official(shared, config):
    """v1 H (OpenCLIP ViT-H/14) and G (ViT-bigG/14): the official keys and shapes. Their large
    tensors are built on the meta device (catseg/modeling/build.py; 1 and 2.5 billion parameters
    otherwise), the small ones as usual; config, release presets and derived sizes as load_config gives them."""
    from detectron2.modeling import META_ARCH_REGISTRY

    from catseg.config import load_config
    from catseg.modeling.build import LargeTensorsOnMeta

    cfg = load_config(str(CONFIGS / config), RANDOM_CLIP + ["MODEL.DEVICE", "cpu"])
    with LargeTensorsOnMeta():
        model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = read_tsv(shared / "reference" / "official_v1_state_dict" / config.replace(".yaml", ".tsv"))
    assert sorted(set(official) - set(ours)) == []
    assert sorted(set(ours) - set(official)) == []
    assert {k: s for k, s in ours.items() if official[k] != s} == {}


def trainable_clip_params(model):
    return {n for n, p in model.sem_seg_head.predictor.clip_model.named_parameters() if p.requires_grad}


def test_finetune_attention_mode():
    trainable = trainable_clip_params(make_model(opts=["MODEL.SEM_SEG_HEAD.CLIP_FINETUNE", "attention"]))
    # tiny CLIP: 2 visual blocks x (in_proj w/b, out_proj w/b) + the visual positional embedding
    expected = {"visual.positional_embedding"} | {
        f"visual.transformer.resblocks.{i}.attn.{p}" for i in range(2)
        for p in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")}
    assert trainable == expected


def test_finetune_full_and_frozen_modes():
    model = make_model(opts=["MODEL.SEM_SEG_HEAD.CLIP_FINETUNE", "full"])
    names = {n for n, _ in model.sem_seg_head.predictor.clip_model.named_parameters()}
    visual = {n for n in names if n.startswith("visual.")}
    assert trainable_clip_params(model) == visual
    assert "token_embedding.weight" in names - visual and "text_projection" in names - visual
    assert trainable_clip_params(make_model(opts=["MODEL.SEM_SEG_HEAD.CLIP_FINETUNE", "none"])) == set()


def test_visual_prompts():
    """PROMPT_DEPTH x PROMPT_LENGTH prompt tokens: the only trainable CLIP parameters; they change the output."""
    model = make_model(opts=["MODEL.SEM_SEG_HEAD.CLIP_FINETUNE", "prompt", "MODEL.SEM_SEG_HEAD.PROMPT_DEPTH", "2",
                             "MODEL.SEM_SEG_HEAD.PROMPT_LENGTH", "3"]).eval()
    prompts = model.sem_seg_head.predictor.clip_model.visual.transformer.prompt_tokens
    assert prompts.shape == (2, 3, 64)
    assert trainable_clip_params(model) == {"visual.transformer.prompt_tokens"}
    image = {"image": torch.randint(0, 255, (3, 96, 128), generator=torch.Generator().manual_seed(0)).float()}
    with torch.no_grad():
        dense = model.clip_encoder(torch.randn(1, 3, 384, 384))["dense"]
        assert dense.shape == (1, 64, 24, 24)  # prompt tokens are dropped after the last block
        before = model([image])[0]["sem_seg"]
        prompts.add_(torch.randn_like(prompts))
        after = model([image])[0]["sem_seg"]
    assert (before - after).abs().max() > 1e-4


def test_training_step_official_bce_and_frozen_params():
    model = make_model().train()
    gen = torch.Generator().manual_seed(0)
    batch = [{"image": torch.randint(0, 255, (3, 64, 64), generator=gen).float(),
              "sem_seg": torch.randint(0, 20, (64, 64), generator=gen)} for _ in range(2)]
    batch[0]["sem_seg"][:10] = 255  # ignored rows
    captured = {}
    model.sem_seg_head.register_forward_hook(lambda m, i, o: captured.update(logits=o))
    loss = model(batch)["loss_sem_seg"]

    # Independent reference: BCE over every pixel and class; ignored pixels have all-zero targets.
    logits = F.interpolate(captured["logits"], size=(64, 64), mode="bilinear", align_corners=False)
    labels = torch.stack([b["sem_seg"] for b in batch])
    target = torch.stack([(labels == c) for c in range(20)], dim=1).float()
    p = logits.sigmoid()
    expected = -(target * p.log() + (1 - target) * (1 - p).log()).mean()
    assert torch.allclose(loss, expected, atol=1e-5)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1.0)
    loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        if not param.requires_grad:
            assert not changed, name
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if "clip_model" in n)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if "transformer" in n)
    # L recipe: the Swin backbone is frozen (BACKBONE_MULTIPLIER 0)
    assert not any(p.requires_grad for p in model.backbone.parameters())


@pytest.mark.parametrize("config", ["tiny.yaml", "cvpr24/tiny_b.yaml"])
@pytest.mark.parametrize("sliding", [False, True])
def test_batch_equals_single_images(sliding, config):
    model = make_model(config, ["TEST.SLIDING_WINDOW", str(sliding)]).eval()
    model.sem_seg_head.predictor.set_test_classes(["cat", "dog", "sky", "road", "wall"])
    gen = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 255, (3, 200, 300), generator=gen).float(),
              torch.randint(0, 255, (3, 333, 250), generator=gen).float()]
    inputs = [{"image": im, "height": im.shape[1], "width": im.shape[2]} for im in images]
    with torch.no_grad():
        batched = model(inputs)
        single = [model([x])[0] for x in inputs]
    for b, s, im in zip(batched, single, images):
        assert b["sem_seg"].shape == (5, *im.shape[1:])
        assert (b["sem_seg"] - s["sem_seg"]).abs().max().item() <= 1e-5


def test_output_resized_to_requested_height_width():
    model = make_model().eval()
    model.sem_seg_head.predictor.set_test_classes(["cat", "dog"])
    image = torch.zeros(3, 100, 140)
    with torch.no_grad():
        out = model([{"image": image, "height": 50, "width": 70}])[0]["sem_seg"]
    assert out.shape == (2, 50, 70)


def test_official_clip_names_resolve_to_open_clip():
    assert clip.resolve_clip("ViT-B/16") == ("ViT-B-16-quickgelu", "openai", None)
    assert clip.resolve_clip("ViT-L/14@336px") == ("ViT-L-14-336-quickgelu", "openai", None)
    assert clip.resolve_clip("ViT-H") == ("ViT-H-14", "laion2b_s32b_b79k", 336)
    assert clip.resolve_clip("ViT-G") == ("ViT-bigG-14", "laion2b_s39b_b160k", 336)
    assert clip.resolve_clip("open_clip:ViT-B-32:laion2b_s34b_b79k") == ("ViT-B-32", "laion2b_s34b_b79k", None)
    assert clip.resolve_clip("ViT-B/16", "catseg-tiny-clip", "random") == ("catseg-tiny-clip", None, None)
    assert clip.default_clip_resolution("ViT-B/16") == (384, 384)
    assert clip.default_clip_resolution("ViT-L/14@336px") == (336, 336)
    with pytest.raises(ValueError, match="CLIP_PRETRAINED"):
        clip.resolve_clip("ViT-X/99")
    with pytest.raises(FileNotFoundError, match="CLIP_WEIGHTS"):
        clip.resolve_clip("ViT-B/16", weights="/nonexistent/clip.pt")


def test_clip_random_weights_are_seeded_and_local_checkpoint_loads(tmp_path):
    a, _ = clip.build_clip("ViT-B/16", "catseg-tiny-clip", "random", seed=0)
    b, _ = clip.build_clip("ViT-B/16", "catseg-tiny-clip", "random", seed=0)
    c, _ = clip.build_clip("ViT-B/16", "catseg-tiny-clip", "random", seed=1)
    assert torch.equal(a.visual.conv1.weight, b.visual.conv1.weight)
    assert not torch.equal(a.visual.conv1.weight, c.visual.conv1.weight)
    path = tmp_path / "clip.pt"
    torch.save(c.state_dict(), path)
    d, _ = clip.build_clip("ViT-B/16", "catseg-tiny-clip", str(path))
    for (name, p), q in zip(c.state_dict().items(), d.state_dict().values()):
        assert torch.equal(p, q), name


def test_synonyms_are_averaged_per_template():
    model, tokenizer = clip.build_clip("ViT-B/16", "catseg-tiny-clip", "random")
    templates = ["a photo of a {}.", "art of the {}."]
    with torch.no_grad():
        both = text.class_embeddings(model, tokenizer, ["sky, heaven"], templates)[0]
        sky = text.class_embeddings(model, tokenizer, ["sky"], templates)[0]
        heaven = text.class_embeddings(model, tokenizer, ["heaven"], templates)[0]
    assert both.shape == (2, 64)
    assert torch.allclose(both, F.normalize(sky + heaven, dim=-1), atol=1e-6)
    assert torch.allclose(sky.norm(dim=-1), torch.ones(2))


def test_text_features_cached_per_class_list_and_cleared_on_load():
    predictor = make_model().eval().sem_seg_head.predictor
    first = predictor.text_features(["cat", "dog"])
    assert predictor.text_features(["cat", "dog"]) is first
    predictor.load_state_dict(predictor.state_dict())
    assert predictor.text_features(["cat", "dog"]) is not first


def test_protocol_config_pools_only_at_inference():
    """configs/ade150.yaml: the training recipe's [2, 2] pooling, none at inference."""
    from helpers import make_cfg
    cfg = make_cfg("ade150.yaml")
    assert list(cfg.MODEL.SEM_SEG_HEAD.POOLING_SIZES) == [2, 2] and list(cfg.TEST.POOLING_SIZES) == [1, 1]
    model = make_model(opts=["TEST.POOLING_SIZES", "[1, 1]"])
    layer = model.sem_seg_head.predictor.transformer.layers[0].attention
    assert tuple(layer.pool.kernel_size) == (2, 2) and tuple(layer.test_pool.kernel_size) == (1, 1)
    model.sem_seg_head.predictor.set_test_classes(["cat", "dog"])
    reference = make_model(opts=["MODEL.SEM_SEG_HEAD.POOLING_SIZES", "[1, 1]"]).eval()
    reference.sem_seg_head.predictor.set_test_classes(["cat", "dog"])
    image = [{"image": torch.randint(0, 255, (3, 64, 64), generator=torch.Generator().manual_seed(2)).float()}]
    with torch.no_grad():
        assert torch.allclose(model.eval()(image)[0]["sem_seg"], reference(image)[0]["sem_seg"], atol=1e-6)
