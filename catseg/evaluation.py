"""Evaluators beyond detectron2's: VOC with background, and the evaluator chosen per dataset.

detectron2's SemSegEvaluator already reads 8-bit PNG and 16-bit TIFF labels (PIL, as int) and
maps the dataset's ignore value (255, 65535, 459) to its extra "ignored" row; `build_evaluator`
picks the evaluator from the dataset metadata's `evaluator_type`.
"""
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import SemSegEvaluator


class BackgroundSemSegEvaluator(SemSegEvaluator):
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


EVALUATORS = {"sem_seg": SemSegEvaluator, "sem_seg_background": BackgroundSemSegEvaluator}


def build_evaluator(dataset_name, output_dir=None, distributed=True):
    """The evaluator for `dataset_name` from its metadata's evaluator_type."""
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "sem_seg")
    if evaluator_type not in EVALUATORS:
        raise NotImplementedError(f"dataset {dataset_name}: no evaluator for evaluator_type "
                                  f"{evaluator_type!r} (known: {', '.join(EVALUATORS)})")
    return EVALUATORS[evaluator_type](dataset_name, distributed=distributed, output_dir=output_dir)
