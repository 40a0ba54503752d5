"""Evaluators beyond detectron2's: metrics from the confusion matrix in both mIoU conventions, VOC
with background, and the evaluator chosen per dataset.

detectron2's SemSegEvaluator already reads 8-bit PNG and 16-bit TIFF labels (PIL, as int) and
maps the dataset's ignore value (255, 65535, 459) to its extra "ignored" row; `build_evaluator`
picks the evaluator from the dataset metadata's `evaluator_type`.

Two mIoU conventions exist, and detectron2's own number depends on its build (the formula
changed after the v0.6 release, in commit f3c1bc19, with the version string unchanged): the
papers average the IoU over the classes present in the ground truth (`mIoU`); the v0.6 wheel
divides the same sum by the number of classes present in the ground truth or predicted, so a
predicted class absent from the ground truth counts as 0 (`mIoU (v0.6 wheel)`). catseg computes
both, and every other summary metric, from the confusion matrix itself.
"""
import os
from typing import NamedTuple

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import SemSegEvaluator

from .atomic import atomic_write

PAPER_MIOU = "mIoU"  # mean IoU over the classes present in the ground truth (the papers' tables)
WHEEL_MIOU = "mIoU (v0.6 wheel)"  # the same IoUs summed, divided by the classes in ground truth or predicted


class ConfusionMetrics(NamedTuple):
    """Metrics of one confusion matrix, in percent: `summary` (mIoU in both conventions, fwIoU,
    mACC, pACC), `iou` and `acc` (K,) per class, NaN for a class absent from the ground truth."""

    summary: dict[str, float]
    iou: np.ndarray
    acc: np.ndarray


def confusion_metrics(conf_matrix: np.ndarray) -> ConfusionMetrics:
    """Metrics of a (K + 1, K + 1) confusion matrix: rows are predicted classes, columns are
    ground-truth classes, index K is the ignored label (left out, as in detectron2).

    A class counts as present when it has ground-truth pixels. IoU = tp / (gt + pred - tp) and
    ACC = tp / gt per present class; fwIoU weights the IoUs by ground-truth pixel share; pACC is
    tp / gt over all pixels.
    """
    conf = conf_matrix[:-1, :-1].astype(float)
    tp, pos_gt, pos_pred = conf.diagonal(), conf.sum(axis=0), conf.sum(axis=1)
    present = pos_gt > 0
    iou, acc = np.full(len(tp), np.nan), np.full(len(tp), np.nan)
    iou[present] = tp[present] / (pos_gt + pos_pred - tp)[present]
    acc[present] = tp[present] / pos_gt[present]
    summary = {PAPER_MIOU: iou[present].mean(),
               WHEEL_MIOU: iou[present].sum() / np.count_nonzero(present | (pos_pred > 0)),
               "fwIoU": np.sum(iou[present] * pos_gt[present]) / pos_gt.sum(),
               "mACC": acc[present].mean(),
               "pACC": tp.sum() / pos_gt.sum()}
    return ConfusionMetrics({k: 100 * float(v) for k, v in summary.items()}, 100 * iou, 100 * acc)


class ConfusionSemSegEvaluator(SemSegEvaluator):
    """SemSegEvaluator whose metrics come from its confusion matrix (`confusion_metrics`), so they
    do not depend on the installed detectron2: mIoU, mIoU (v0.6 wheel), fwIoU, mACC, pACC, then
    IoU-<class> and ACC-<class>; detectron2's other keys (boundary IoU) follow unchanged."""

    def evaluate(self):
        results = super().evaluate()  # sums the confusion matrices of all processes into the main one's
        if results is None:  # not the main process
            return None
        metrics = confusion_metrics(self._conf_matrix)
        ours = {**metrics.summary, **{f"IoU-{name}": v for name, v in zip(self._class_names, metrics.iou)},
                **{f"ACC-{name}": v for name, v in zip(self._class_names, metrics.acc)}}
        res = {**ours, **{k: v for k, v in results["sem_seg"].items() if k not in ours}}
        if self._output_dir:  # replaces detectron2's copy of its own numbers
            atomic_write(os.path.join(self._output_dir, "sem_seg_evaluation.pth"), lambda f: torch.save(res, f))
        return {"sem_seg": res}


class BackgroundSemSegEvaluator(ConfusionSemSegEvaluator):
    """SemSegEvaluator where every predicted index >= the background id counts as background.

    For VOC-20b: the model scores the 59 prompts of voc20b (20 VOC classes, then 39 stand-ins
    for background) while the dataset has 21 classes (20 VOC + "background" = id 20). The
    background id is the last dataset class.
    """

    def __init__(self, dataset_name, distributed=True, output_dir=None):
        super().__init__(dataset_name, distributed=distributed, output_dir=output_dir)
        self._background = len(MetadataCatalog.get(dataset_name).stuff_classes) - 1

    def merge_background(self, scores: torch.Tensor) -> torch.Tensor:
        """(K, H, W) scores -> (background + 1, H, W) whose argmax is min(argmax, background).

        Channels >= background are reduced by max, so ties resolve as in the argmax of `scores`
        (first index wins).
        """
        b = self._background
        return torch.cat([scores[:b], scores[b:].max(dim=0, keepdim=True).values], dim=0)

    def process(self, inputs, outputs):
        merged = [{"sem_seg": self.merge_background(o["sem_seg"])} for o in outputs]
        super().process(inputs, merged)


EVALUATORS = {"sem_seg": ConfusionSemSegEvaluator, "sem_seg_background": BackgroundSemSegEvaluator}


def build_evaluator(dataset_name, output_dir=None, distributed=True):
    """The evaluator for `dataset_name` from its metadata's evaluator_type."""
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "sem_seg")
    if evaluator_type not in EVALUATORS:
        raise NotImplementedError(f"dataset {dataset_name}: no evaluator for evaluator_type "
                                  f"{evaluator_type!r} (known: {', '.join(EVALUATORS)})")
    return EVALUATORS[evaluator_type](dataset_name, distributed=distributed, output_dir=output_dir)
