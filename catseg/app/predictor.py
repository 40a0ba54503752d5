"""OpenVocabPredictor: image(s) + your class names -> segmentation, for scripts and the demo.

    from catseg import OpenVocabPredictor
    predictor = OpenVocabPredictor("configs/vitl_swinb_384.yaml", weights="model_final.pth")
    result = predictor.predict("photo.jpg", ["cat, kitten", "sofa", "floor"])
    result.labels        # (h, w) int64 class ids into result.classes
    result.probs         # (T, h, w) float32 per-class probabilities (sigmoid scores)
    result.classes       # the class list actually used (normalised, duplicates removed)

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

Memory bound: an image whose longer side exceeds cfg.TEST.MAX_INPUT_SIDE (default 1280) is
first downscaled to it (area resampling; JPEGs decode directly at a reduced scale), so the
output maps are at most MAX_INPUT_SIDE on their longer side: `probs` takes at most
T x MAX_INPUT_SIDE^2 x 4 bytes (150 classes at 1280 x 1280: 0.98 GB); the network itself
always sees fixed-size views (CLIP / backbone resolution, or the sliding-window crops of
TEST.SLIDING_OUT_RES). `image_size` keeps the input's own size. Image files (and PIL images)
with more than cfg.INPUT.MAX_IMAGE_PIXELS pixels are refused from their header, before decoding.
"""
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from detectron2.config import CfgNode

from ..config import load_config
from ..data.dataset_classes import resolve_class_lists
from ..data.datasets import register_from_config
from ..errors import ConfigError
from ..image_io import ImageInput, ImageReadError, load_image
from ..modeling.build import build_from_checkpoint
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
        trained; they need not sum to 1).
    classes: the T class names used.
    image: (h, w, 3) uint8 RGB image the maps align with (downscaled input, if it was large).
    image_size: (H, W) of the input before any downscaling (after EXIF rotation).
    """

    labels: torch.Tensor
    probs: torch.Tensor
    classes: List[str]
    image: np.ndarray = field(repr=False)
    image_size: Tuple[int, int]

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
            `predictor.refiner` may also be set to any Segmentation -> Segmentation callable.
    """

    def __init__(self, config: Union[str, CfgNode], weights: Optional[str] = None, opts: Sequence[str] = (),
                 batch_size: int = 2, max_side: Optional[int] = None, refine: str = ""):
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
        outputs = self.network(inputs)
        classes = self.classes
        results = [Segmentation(labels=out["sem_seg"].argmax(0).cpu(), probs=out["sem_seg"].float().cpu(),
                                classes=classes, image=rgb, image_size=size)
                   for out, (rgb, size) in zip(outputs, prepared)]
        return [self.refiner(r) for r in results] if self.refiner else results


class _Keyed:
    """(key, image) pairs of a re-iterable of images (picklable, for DataLoader workers)."""

    def __init__(self, images: Iterable[ImageInput]):
        self.images = images

    def __iter__(self):
        return ((None, image) for image in self.images)
