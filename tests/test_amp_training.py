"""SOLVER.AMP.ENABLED on the CPU (bfloat16 autocast of the training forward, approximate): matrix
products in the forward run in bf16 while parameters, gradients, optimizer state, the loss and
the cached text embeddings stay fp32; two steps track the fp32 run from the same seed; with AMP
off nothing runs in bf16; training autocast and inference autocast (TEST.BF16) are independent.
"""
import math

import pytest
import torch
from detectron2.modeling import build_model
from torch.overrides import TorchFunctionMode
from train_helpers import mini_quickstart, quickstart_cfg

from catseg.engine import CATSegTrainer

STEPS = 2
MATMULS = {"linear", "conv2d", "matmul", "bmm", "einsum", "baddbmm", "addmm", "scaled_dot_product_attention"}


def tensors(obj):
    """The tensors in a (nested) tuple / list / dict."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in tensors(x)]
    if isinstance(obj, dict):
        return [t for x in obj.values() for t in tensors(x)]
    return []


class DtypeLog(TorchFunctionMode):
    """Records (function name, input dtypes, output dtypes) of every torch function called."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", str(func))
        self.calls.append((name, {t.dtype for t in tensors((args, kwargs))}, {t.dtype for t in tensors(out)}))
        return out

    def bf16_outputs(self):
        return {name for name, _, outs in self.calls if torch.bfloat16 in outs}


def module_output_dtypes(model):
    """{module name: dtypes of its outputs}, filled by forward hooks (returns the dict and the hooks)."""
    seen = {}

    def hook(name):
        return lambda module, inputs, output: seen.setdefault(name, set()).update(t.dtype for t in tensors(output))
    return seen, [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return mini_quickstart(tmp_path_factory.mktemp("qs"), train=8, val=2, size=64)


def train(data, out, amp: bool):
    """STEPS iterations of the quick-start recipe from seed 0 (data seed 3), every torch function
    call and module output recorded. Returns a dict of what the tests look at."""
    torch.manual_seed(0)
    cfg = quickstart_cfg(data, out, SOLVER__MAX_ITER=STEPS, SOLVER__CHECKPOINT_PERIOD=1000, DATASETS__TEST="()",
                         SOLVER__AMP__ENABLED=amp, SEED=3, MODEL__SEM_SEG_HEAD__TEXT_CACHE=False)
    trainer = CATSegTrainer(cfg)
    trainer.resume_or_load(resume=False)
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    modules, hooks = module_output_dtypes(trainer.model)
    with DtypeLog() as log:
        trainer.train()
    for h in hooks:
        h.remove()
    return {"trainer": trainer, "initial": initial, "log": log, "modules": modules,
            "losses": [v for v, _ in trainer.storage.history("total_loss").values()]}


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return {amp: train(data, out / f"amp{int(amp)}", amp) for amp in (False, True)}


def test_amp_forward_runs_in_bf16_with_fp32_state(runs):
    run = runs[True]
    model, optimizer = run["trainer"].model, run["trainer"].optimizer
    # matrix products of the forward, among them the aggregator's linear layers, give bf16
    assert run["log"].bf16_outputs() & MATMULS, run["log"].bf16_outputs()
    aggregator = "sem_seg_head.predictor.transformer."
    bf16_linears = [n for n, m in model.named_modules() if n.startswith(aggregator)
                    and isinstance(m, torch.nn.Linear) and torch.bfloat16 in run["modules"].get(n, ())]
    assert bf16_linears
    # the network's output is cast back: the loss gets fp32 logits and targets, and is fp32
    # (the loss: lean_autograd.upsampled_bce, whose forward calls log_sigmoid once; the plain one
    # binary_cross_entropy_with_logits)
    bce = [(ins, outs) for name, ins, outs in run["log"].calls
           if name in ("binary_cross_entropy_with_logits", "log_sigmoid")]
    assert len(bce) == STEPS and all(ins == outs == {torch.float32} for ins, outs in bce), bce
    # weights, gradients and optimizer state stay fp32
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params)
    grads = [p.grad for p in params if p.grad is not None]
    assert len(grads) > len(params) // 2 and all(g.dtype == torch.float32 for g in grads)
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.is_floating_point()]
    assert state and all(t.dtype == torch.float32 for t in state)


def test_amp_caches_fp32_text_embeddings(runs):
    """The frozen text tower's embeddings, first computed inside the autocast training forward, are
    cached for later (fp32) passes: they must be the fp32 ones (bf16 ones differ by ~3e-3)."""
    predictor = runs[True]["trainer"].model.sem_seg_head.predictor
    cached = list(predictor._text_cache.values())
    assert len(cached) == 1
    predictor._text_cache.clear()
    with torch.no_grad():
        assert torch.equal(cached[0], predictor.text_features())


def test_amp_steps_track_fp32(runs):
    fp32, bf16 = runs[False], runs[True]
    assert len(bf16["losses"]) == STEPS and all(math.isfinite(x) for x in bf16["losses"])
    # Measured (tiny quick-start, CPU): losses 0.7659 / 0.6248 (fp32) and 0.7665 / 0.6245 (bf16),
    # relative difference <= 8e-4 (3.2e-3 on the CVPR'24 quick-start); 1e-2 allows for other CPUs'
    # bf16 kernels while catching a broken forward.
    assert bf16["losses"] == pytest.approx(fp32["losses"], rel=1e-2)

    # Weights: AdamW's first steps move every weight by about lr * sign(gradient), so a weight whose
    # gradient is near zero may move the other way under bf16 rounding; a max-abs bound cannot tell
    # rounding from a wrong gradient (measured: 2.6e-3 for bf16 and 3.0e-3 for fp32 on a different
    # data seed). The whole update vector can: | u_bf16 - u_fp32 | / | u_fp32 | was 0.093 for bf16
    # (cosine 0.996; CVPR'24 quick-start 0.082) and 0.78 for fp32 on a different data seed (cosine
    # 0.69). The bound 0.25 sits between, with room for other CPUs' rounding.
    initial = fp32["initial"]

    def update(run):
        params = dict(run["trainer"].model.named_parameters())
        return torch.cat([(params[n].detach() - initial[n]).flatten() for n in initial])
    for n in initial:  # same initial weights in both runs
        assert torch.equal(initial[n], bf16["initial"][n])
    u_fp32, u_bf16 = update(fp32), update(bf16)
    relative = ((u_bf16 - u_fp32).norm() / u_fp32.norm()).item()
    assert 0 < relative < 0.25, relative


def test_no_bf16_without_amp(runs):
    run = runs[False]
    assert run["log"].calls and not run["log"].bf16_outputs()
    assert run["modules"] and not [n for n, dtypes in run["modules"].items() if torch.bfloat16 in dtypes]


@pytest.mark.parametrize("amp, test_bf16", [(True, False), (False, True)])
def test_training_and_inference_autocast_are_independent(data, tmp_path, amp, test_bf16):
    """SOLVER.AMP.ENABLED autocasts only the training forward, TEST.BF16 only inference."""
    torch.manual_seed(0)
    cfg = quickstart_cfg(data, tmp_path, SOLVER__AMP__ENABLED=amp, TEST__BF16=test_bf16,
                         MODEL__SEM_SEG_HEAD__TEXT_CACHE=False)
    model = build_model(cfg)
    image = torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8)
    label = torch.randint(0, 6, (128, 128), dtype=torch.uint8)
    bf16_in = {}
    for training in (True, False):
        model.train(training)
        with DtypeLog() as log:
            model([{"image": image, "sem_seg": label}])
        bf16_in[training] = bool(log.bf16_outputs())
    assert bf16_in == {True: amp, False: test_bf16}
