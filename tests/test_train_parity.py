"""Training-step parity with the official code on the shared training fixtures.

Each fixture holds the official model state before training, one batch of two images, and what
two official AdamW steps (official parameter groups, full-model gradient clipping,
WarmupCosineLR) did: the trainable set, every parameter's lr and weight decay, both losses and
every changed tensor. We rebuild the tiny model (v1: configs/tiny.yaml with a trainable Swin;
CVPR'24: configs/cvpr24/tiny_b.yaml, whose text tower trains too), load the state, run the same
two steps through catseg's optimizer and scheduler builders, and compare (tolerances:
../shared/reference/README.md).
"""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler
from helpers import make_cfg, param_names_by_group

from catseg.engine.solver import build_optimizer

V1_OPTS = ["MODEL.SWIN.DROP_PATH_RATE", "0.0", "SOLVER.BACKBONE_MULTIPLIER", "0.01"]
FIXTURES = {  # test id: (fixture, config, options)
    "v1": ("catseg_v1_train_tiny_s4.pt", "tiny.yaml", V1_OPTS),
    # activation checkpointing over class chunks, as well
    "v1-checkpointed": ("catseg_v1_train_tiny_s4.pt", "tiny.yaml",
                        V1_OPTS + ["MODEL.SEM_SEG_HEAD.CHECKPOINT_ACTIVATIONS", "True",
                                   "MODEL.SEM_SEG_HEAD.CLASS_CHUNK_SIZE", "2"]),
    "cvpr24": ("catseg_cvpr24_train_tiny_s5.pt", "cvpr24/tiny_b.yaml", []),
}
TOL = 1e-5
# Adam normalises each element's step, so an element whose gradient nearly cancels moves by a
# visibly different fraction of the lr under any exact but differently ordered computation
# (reference README, "Caveat"). On the CVPR'24 fixture our own fused and plain paths differ by
# up to 3.9e-5 in such elements; against the official run, one element of the 225,793 changed
# ones exceeds 1e-5 (1.4e-5). At most a handful may, by at most a quarter of the base lr.
SENSITIVE_TOL, SENSITIVE_MAX_COUNT = 0.25 * 2e-4, 4


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def trained(request, shared):
    """(fixture, model, optimizer, losses) after two steps with every optimisation on."""
    fixture, config, opts = FIXTURES[request.param]
    ref = torch.load(shared / "reference" / "parity" / fixture, weights_only=False)
    cfg = make_cfg(config, opts)
    model = build_model(cfg)
    model.load_state_dict(ref["state_before"], strict=True)
    model.sem_seg_head.predictor.train_class_names = list(ref["class_names"])
    model.train()
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    groups = param_names_by_group(model, optimizer)
    batch = [dict(x, image=x["image"].float()) for x in ref["batch"]]
    losses = []
    torch.manual_seed(0)
    for _ in range(2):
        loss = model(batch)["loss_sem_seg"]
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return ref, model, groups, losses


def test_trainable_set(trained):
    ref, model, _, _ = trained
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(ref["trainable"])


def test_lr_and_weight_decay_per_parameter(trained):
    ref, _, groups, _ = trained
    expected = {name: g for g in ref["param_groups"] for name in g["names"]}
    assert set(groups) == set(expected)
    for name, g in expected.items():
        assert abs(groups[name]["lr"] - g["lr"]) <= 1e-12, name
        assert abs(groups[name]["weight_decay"] - g["weight_decay"]) <= 1e-12, name


def test_losses(trained):
    ref, _, _, losses = trained
    assert losses == pytest.approx(list(ref["losses"]), abs=TOL)


def test_weights_after_two_steps(trained):
    """Changed tensors equal the official ones, unchanged ones stay; CLIP tensors also move by
    the official step (their steps, ~4e-6, are below the value tolerance)."""
    ref, model, _, _ = trained
    ours, before, after = model.state_dict(), ref["state_before"], ref["state_after"]
    sensitive = 0
    for name, value in before.items():
        if name in after:
            diff = (ours[name] - after[name]).abs()
            assert diff.max().item() <= SENSITIVE_TOL, name
            sensitive += int((diff > TOL).sum())
            assert not torch.equal(ours[name], before[name]), name
            if "clip_model" in name:
                ref_step = (after[name] - value).abs().max()
                assert ((ours[name] - value) - (after[name] - value)).abs().max() <= 5e-2 * ref_step, name
        else:
            assert (ours[name] - value).abs().max().item() <= TOL, name
    assert sensitive <= SENSITIVE_MAX_COUNT, f"{sensitive} elements differ by more than {TOL}"
