"""Exact resume: N iterations in one go == N/2, crash, --resume for the rest (CPU, shuffling and
augmentation on: multi-scale resize, random crop, SSD colour, flip; drop path on).

Bitwise equality is expected: CPU kernels are deterministic, the batches are the same tensors,
optimizer / scheduler / iteration / data seed come back from the checkpoint, and torch's RNG is
re-seeded every iteration from (data seed, iteration, rank).
"""
import pytest
import torch
from detectron2.engine import hooks
from train_helpers import batch_fingerprint, mini_quickstart, quickstart_cfg

from catseg.engine import CATSegTrainer

N = 4


class Recording:
    """Wraps a data loader, recording a fingerprint of every batch handed to the model."""

    def __init__(self, loader, log):
        self.loader, self.log = loader, log

    def __iter__(self):
        inner = iter(self.loader)  # created now, as the trainer expects (it draws a worker seed)
        return self._record(inner)

    def _record(self, inner):
        for batch in inner:
            self.log.append(batch_fingerprint(batch))
            yield batch


class Crash(hooks.HookBase):
    def __init__(self, at_iter):
        self.at_iter = at_iter

    def after_step(self):
        if self.trainer.iter == self.at_iter:
            raise KeyboardInterrupt("simulated kill")


def _trainer(data, out, workers, seed=-1, config="quickstart.yaml"):
    torch.manual_seed(0)  # same initial weights in both runs (train_net seeds via default_setup)
    cfg = quickstart_cfg(data, out, config, SOLVER__MAX_ITER=N, SOLVER__CHECKPOINT_PERIOD=N // 2,
                         SOLVER__IMS_PER_BATCH=2, DATASETS__TEST="()", INPUT__COLOR_AUG_SSD=True,
                         MODEL__SWIN__DROP_PATH_RATE=0.3, DATALOADER__NUM_WORKERS=workers, SEED=seed)
    return CATSegTrainer(cfg)


def _run(trainer, log, resume=False):
    trainer._trainer.data_loader = Recording(trainer._trainer.data_loader, log)
    trainer.resume_or_load(resume=resume)
    trainer.train()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return mini_quickstart(tmp_path_factory.mktemp("qs"), train=5, val=1)


@pytest.mark.parametrize("config", ["quickstart.yaml", "cvpr24/quickstart.yaml"])
def test_resume_is_exact(data, tmp_path, config):
    full_log, first_log, second_log = [], [], []
    _run(_trainer(data, tmp_path / "full", workers=0, seed=7, config=config), full_log)

    interrupted = _trainer(data, tmp_path / "split", workers=2, seed=7, config=config)
    interrupted.register_hooks([Crash(N // 2 - 1)])
    with pytest.raises(KeyboardInterrupt):
        _run(interrupted, first_log)
    assert (tmp_path / "split" / "last_checkpoint").read_text() == f"model_{N // 2 - 1:07d}.pth"

    # SEED -1 (random): the data seed 7 must come back from the checkpoint
    resumed = _trainer(data, tmp_path / "split", workers=2, seed=-1, config=config)
    _run(resumed, second_log, resume=True)
    assert resumed.start_iter == N // 2

    assert len(full_log) == N and len(set(full_log)) == N
    assert first_log == full_log[: N // 2]
    assert second_log == full_log[N // 2:], "batches after resuming differ from the uninterrupted run"
    final_full = torch.load(tmp_path / "full" / "model_final.pth", weights_only=False)["model"]
    final_split = torch.load(tmp_path / "split" / "model_final.pth", weights_only=False)["model"]
    for key, value in final_full.items():
        assert torch.equal(value, final_split[key]), key
    first = torch.load(tmp_path / "full" / f"model_{N // 2 - 1:07d}.pth", weights_only=False)["model"]
    changed = sum(not torch.equal(v, first[k]) for k, v in final_full.items())
    assert changed > 0, "the second half must have trained something"


def test_sampler_continues_the_stream():
    import itertools

    from catseg.engine.data_stream import ResumableTrainingSampler
    whole = ResumableTrainingSampler(7, total_batch_size=3, seed=5, rank=0, world_size=1)
    later = ResumableTrainingSampler(7, total_batch_size=3, seed=5, rank=0, world_size=1)
    later.set_start_iter(4)
    stream = list(itertools.islice(iter(whole), 30))
    assert list(itertools.islice(iter(later), 18)) == stream[12:]
    assert sorted(i for i, _ in stream[:7]) == list(range(7)), "each epoch is a permutation"
    assert [i for i, _ in stream[:7]] != list(range(7)), "shuffled"
    ranks = [ResumableTrainingSampler(7, 4, 5, rank=r, world_size=2) for r in (0, 1)]
    merged = [x for pair in zip(*(itertools.islice(iter(s), 10) for s in ranks)) for x in pair]
    assert merged == list(itertools.islice(iter(ResumableTrainingSampler(7, 4, 5, rank=0, world_size=1)), 20))
