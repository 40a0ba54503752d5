"""OpenVocabPredictor: image(s) + your class names -> segmentation, for scripts and the demo.

    from catseg import OpenVocabPredictor
    predictor = OpenVocabPredictor("configs/vitl_swinb_384.yaml", weights="model_final.pth")
    result = predictor.predict("photo.jpg", ["cat, kitten", "sofa", "floor"])
    result.labels        # (h, w) int64 class ids into result.classes
    result.probs         # (T, h, w) float32 per-class probabilities (sigmoid scores)
    result.classes       # the class list actually used (normalised, duplicates removed)

    labeller = OpenVocabPredictor("configs/vitl_swinb_384.yaml", weights="model_final.pth", output="labels")
    result = labeller.predict("photo.jpg", ["cat", "sofa", "floor"])
    result.probs         # None: only the labels and the top-k were computed (class chunk by class chunk)
    result.top_scores    # (k, h, w) float32 best k probabilities per pixel, best first (TEST.TOPK, default 3)
    result.top_classes   # (k, h, w) int64 their class ids; result.labels == result.top_classes[0]

Images: file paths, PIL images or numpy arrays (`format="RGB"` or "BGR"; see catseg.image_io).
A list of images is run in batches of `batch_size`; each image gets exactly what it gets alone.
`segment_many(images, num_workers=2)` streams any number of images: DataLoader workers decode
them while the network runs, batches group images by size, results come back in input order
(catseg/app/image_stream.py).
Whole-image or sliding-window inference follows cfg.TEST.SLIDING_WINDOW, test-time augmentation
cfg.TEST.AUG (ENABLED, MIN_SIZES, MAX_SIZE, FLIP); the device follows cfg.MODEL.DEVICE ("cuda"
without a GPU: the CPU, see catseg.config.loader.resolve_device); everything runs under
torch.inference_mode.

Start-up problems raise catseg.errors.CatsegError subclasses with a one-line message: ConfigError
(missing config file, unknown key, ...) and WeightsError (missing, corrupt or mismatched weights).

Output: `output="probs"` (the default, cfg.TEST.OUTPUT) keeps every class's probability map;
`output="labels"` keeps the labels and the top-`topk` (cfg.TEST.TOPK) scores and class ids, which
the model computes over class chunks without ever holding the (T, h, w) probabilities (the
command lines use it). Two cases still compute the whole probabilities, then reduce them: SAM
refinement (and any `refiner`: SAM labels a mask with the class of highest mean probability over
it, which needs every class) and test-time augmentation (it averages probabilities).

Memory bound: an image whose longer side exceeds cfg.TEST.MAX_INPUT_SIDE (default 1280) is
first downscaled to it (area resampling; JPEGs decode directly at a reduced scale), so the
output maps are at most MAX_INPUT_SIDE on their longer side: `probs` takes at most
T x MAX_INPUT_SIDE^2 x 4 bytes (150 classes at 1280 x 1280: 0.98 GB; with `output="labels"`,
k x MAX_INPUT_SIDE^2 x 12 bytes plus one class chunk); the network itself
always sees fixed-size views (CLIP / backbone resolution, or the sliding-window crops of
TEST.SLIDING_OUT_RES). `image_size` keeps the input's own size. Image files (and PIL images)
with more than cfg.INPUT.MAX_IMAGE_PIXELS pixels are refused from their header, before decoding.
"""
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from detectron2.config import CfgNode

from ..config import load_config
from ..data.dataset_classes import resolve_class_lists
from ..data.datasets import register_from_config
from ..errors import ConfigError
from ..image_io import ImageInput, ImageReadError, load_image
from ..modeling.build import build_from_checkpoint
from ..modeling.meta_arch import check_output
from ..modeling.tta import CATSegWithTTA
from ..weights.hub import fetch_config_weights
from .image_stream import BLOCK_BATCHES, ImageStream, in_input_order, segmented
from .sam_refine import SamRefiner
from .vocabulary import clean_vocabulary


@dataclass
class Segmentation:
    """One image's result.

    labels: (h, w) int64, index into `classes` of the most probable class per pixel.
    probs: (T, h, w) float32 per-class probabilities (independent sigmoids, as CAT-Seg is
        trained; they need not sum to 1); None for a labels-only result (`output="labels"`).
    classes: the T class names used.
    image: (h, w, 3) uint8 RGB image the maps align with (downscaled input, if it was large).
    image_size: (H, W) of the input before any downscaling (after EXIF rotation).
    top_scores: labels-only results: (k, h, w) float32, the k best probabilities per pixel, best
        first (k = min(TEST.TOPK, T)); top_scores[0] is the probability of CAT-Seg's label. None
        for a probabilities result (see `top_k`).
    top_classes: labels-only results: (k, h, w) int64 class ids of `top_scores` (lower id first
        among equal scores); equal to `labels` in row 0 unless a refiner changed the labels.
    """

    labels: torch.Tensor
    probs: Optional[torch.Tensor]
    classes: List[str]
    image: np.ndarray = field(repr=False)
    image_size: Tuple[int, int]
    top_scores: Optional[torch.Tensor] = field(default=None, repr=False)
    top_classes: Optional[torch.Tensor] = field(default=None, repr=False)

    def top_k(self, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """((k, h, w) float32 scores, (k, h, w) int64 class ids) of the k most probable classes per
        pixel, best first, lower id first among equal scores; from `probs` or, for a labels-only
        result, from `top_scores` / `top_classes` (k at most theirs: ValueError otherwise)."""
        if self.probs is not None:
            scores, ids = self.probs.sort(dim=0, descending=True, stable=True)
            return scores[:k], ids[:k]
        if self.top_scores is None or k > len(self.top_scores) and len(self.top_scores) < len(self.classes):
            have = 0 if self.top_scores is None else len(self.top_scores)
            raise ValueError(f"top {k} classes asked of a labels-only result that kept {have} (TEST.TOPK)")
        return self.top_scores[:k], self.top_classes[:k]

    def pixel_shares(self) -> List[float]:
        """Share of pixels labelled with each class, in class order (sums to 1)."""
        counts = torch.bincount(self.labels.flatten(), minlength=len(self.classes))
        return (counts.double() / self.labels.numel()).tolist()

    def present(self) -> List[int]:
        """Ids of the classes that label at least one pixel, largest share first."""
        shares = self.pixel_shares()
        return sorted((i for i, s in enumerate(shares) if s > 0), key=lambda i: (-shares[i], i))


class OpenVocabPredictor:
    """See the module docstring.

    Args:
        config: a YAML path or a CfgNode (catseg keys added).
        weights: checkpoint path, `hf://` name or huggingface.co link (default cfg.MODEL.WEIGHTS; ""
            keeps the built weights). Hub files (here and in CLIP_WEIGHTS, MODEL.SAM.WEIGHTS) are
            downloaded first (catseg/weights/hub.py).
        opts: KEY VALUE config overrides.
        batch_size: images per network pass.
        max_side: overrides cfg.TEST.MAX_INPUT_SIDE (0: never downscale).
        refine: "sam" for SAM-refined labels (catseg.app.sam_refine; SAM from cfg.MODEL.SAM), "" for none.
            `predictor.refiner` may also be set to any Segmentation -> Segmentation callable; it
            gets the whole probabilities whatever `output` says.
        output: "probs" or "labels" (default cfg.TEST.OUTPUT; see the module docstring).
        topk: classes per pixel a labels-only result keeps (default cfg.TEST.TOPK).
    """

    def __init__(self, config: Union[str, CfgNode], weights: Optional[str] = None, opts: Sequence[str] = (),
                 batch_size: int = 2, max_side: Optional[int] = None, refine: str = "",
                 output: Optional[str] = None, topk: Optional[int] = None):
        self.cfg = load_config(config, opts)
        if weights is not None:
            self.cfg.MODEL.WEIGHTS = weights
        fetch_config_weights(self.cfg)
        head = self.cfg.MODEL.SEM_SEG_HEAD
        if not (head.TRAIN_CLASS_JSON and head.TEST_CLASS_JSON):  # "": the datasets' class list
            register_from_config(self.cfg)
            resolve_class_lists(self.cfg, train=False, check=False)
        if refine not in ("", "sam"):
            raise ConfigError(f"refine {refine!r}: expected \"sam\" or \"\"")
        try:
            self.output = check_output(self.cfg.TEST.OUTPUT if output is None else output,
                                       self.cfg.TEST.TOPK if topk is None else topk)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.topk = self.cfg.TEST.TOPK if topk is None else topk
        self.refiner: Optional[Callable[[Segmentation], Segmentation]] = \
            SamRefiner.from_config(self.cfg) if refine == "sam" else None
        # with weights: built straight from the checkpoint (no random initialisation, memory-mapped)
        self.model = build_from_checkpoint(self.cfg).eval()
        # TEST.AUG.ENABLED: every image runs through test-time augmentation (catseg/modeling/tta.py)
        self.network = CATSegWithTTA(self.cfg, self.model) if self.cfg.TEST.AUG.ENABLED else self.model
        self.batch_size = max(1, batch_size)
        self.max_side = self.cfg.TEST.MAX_INPUT_SIDE if max_side is None else max_side
        self.text_seconds: Optional[float] = None  # time of the latest text-embedding stage

    @property
    def head(self):
        return self.model.sem_seg_head.predictor

    @property
    def classes(self) -> List[str]:
        """The current vocabulary."""
        return list(self.head.test_class_names)

    def set_vocabulary(self, vocabulary: Sequence[str]) -> List[str]:
        """Clean `vocabulary` (see catseg.app.vocabulary.clean_vocabulary), make it current and
        compute its text embeddings (disk-cached); returns the class list used."""
        classes = clean_vocabulary(vocabulary)
        self.head.set_test_classes(classes)
        start = time.perf_counter()
        with torch.no_grad():  # ordinary tensors in the head's in-memory cache (see CATSeg.forward)
            self.head.text_features()
        self.text_seconds = time.perf_counter() - start
        return classes

    def prepare(self, image: ImageInput, format: str = "RGB") -> Tuple[np.ndarray, Tuple[int, int]]:
        """-> ((h, w, 3) uint8 RGB the network sees, (H, W) input size); see catseg.image_io."""
        return load_image(image, format, self.max_side, self.cfg.INPUT.MAX_IMAGE_PIXELS)

    def predict(self, images: Union[ImageInput, Sequence[ImageInput]], vocabulary: Optional[Sequence[str]] = None,
                format: str = "RGB") -> Union[Segmentation, List[Segmentation]]:
        """Segment one image (-> Segmentation) or a list of images (-> list) with `vocabulary`
        (default: the current one, initially cfg's TEST_CLASS_JSON)."""
        single = not isinstance(images, (list, tuple))
        if vocabulary is not None:
            self.set_vocabulary(vocabulary)
        prepared = [self.prepare(im, format) for im in ([images] if single else images)]
        results = []
        for start in range(0, len(prepared), self.batch_size):
            results.extend(self.run(prepared[start:start + self.batch_size]))
        return results[0] if single else results

    def segment_many(self, images: Iterable[ImageInput], vocabulary: Optional[Sequence[str]] = None,
                     num_workers: int = 0, format: str = "RGB",
                     errors: str = "raise") -> Iterator[Union[Segmentation, ImageReadError]]:
        """Segment a stream of images, yielding one result per image in input order.

        Memory stays bounded whatever the number of images (a few blocks of 4 batches are
        decoded ahead; see catseg/app/image_stream.py).
        `num_workers` DataLoader workers decode and downscale images beside the network; they
        iterate `images` themselves, so then pass a list (or another re-iterable), not a
        generator. An unreadable image raises ImageReadError (`errors="raise"`) or, with
        `errors="yield"`, its ImageReadError is yielded in its place.
        """
        if errors not in ("raise", "yield"):
            raise ValueError(f"errors={errors!r}: expected 'raise' or 'yield'")
        if vocabulary is not None:
            self.set_vocabulary(vocabulary)
        stream = ImageStream(_Keyed(images), BLOCK_BATCHES * self.batch_size, max_side=self.max_side, format=format)
        for item, result in in_input_order(segmented(self, stream, num_workers)):
            if result is None:
                error = ImageReadError(item.error)
                if errors == "raise":
                    raise error
                yield error
            else:
                yield result

    @torch.inference_mode()
    def run(self, prepared: Sequence[Tuple[np.ndarray, Tuple[int, int]]]) -> List[Segmentation]:
        """One network pass over prepared images (see `prepare`)."""
        inputs = [{"image": torch.from_numpy(rgb).permute(2, 0, 1).float(), "height": rgb.shape[0],
                   "width": rgb.shape[1]} for rgb, _ in prepared]
        # a refiner needs the whole probabilities (SAM: every class's mean over a mask)
        output = "probs" if self.refiner else self.output
        outputs = self.network(inputs, output=output, topk=self.topk)
        classes = self.classes
        results = [segmentation(out, classes, rgb, size) for out, (rgb, size) in zip(outputs, prepared)]
        if self.refiner:
            results = [self.refiner(r) for r in results]
            if self.output == "labels":  # then keep what a labels-only result keeps
                results = [labels_only(r, self.topk) for r in results]
        return results


def segmentation(out: Dict[str, torch.Tensor], classes: List[str], rgb: np.ndarray,
                 size: Tuple[int, int]) -> Segmentation:
    """The Segmentation of one model output (CATSeg.forward, "probs" or "labels")."""
    if "sem_seg" in out:
        probs = out["sem_seg"]
        return Segmentation(labels=probs.argmax(0).cpu(), probs=probs.float().cpu(), classes=classes, image=rgb,
                            image_size=size)
    return Segmentation(labels=out["sem_seg_labels"].cpu(), probs=None, classes=classes, image=rgb, image_size=size,
                        top_scores=out["sem_seg_topk_scores"].float().cpu(),
                        top_classes=out["sem_seg_topk_classes"].cpu())


def labels_only(result: Segmentation, k: int) -> Segmentation:
    """`result` with its probabilities reduced to the top-k (labels unchanged) and dropped."""
    scores, ids = result.top_k(k)
    return dataclasses.replace(result, probs=None, top_scores=scores.clone(), top_classes=ids.clone())


class _Keyed:
    """(key, image) pairs of a re-iterable of images (picklable, for DataLoader workers)."""

    def __init__(self, images: Iterable[ImageInput]):
        self.images = images

    def __iter__(self):
        return ((None, image) for image in self.images)
