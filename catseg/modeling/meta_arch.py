"""CATSeg meta-architecture: normalisation, dense CLIP features, guidance, loss, inference.

Data flow (`run_network`): CLIP-normalised views -> DenseCLIPEncoder (dense features and the
intermediate block outputs the guidance source asks for) -> guidance source (a detectron2
backbone on the backbone-normalised views, v1; or CLIP's own features, CVPR'24) -> CATSegHead
(text embeddings, Aggregator) -> logits. The meta-architecture does not know which release it
runs: that is the config's choice of encoder options, guidance source and aggregator options.

Inference pads and post-processes every image on its own (official parity is defined per
image), so a batch gives each image exactly what it gets alone; the network itself still runs
on the whole batch at once, since every view is resized to fixed CLIP / backbone resolutions.
"""
from contextlib import contextmanager, nullcontext
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList
from einops import rearrange
from torch import nn

from ..padding import pad_to_multiple
from .aggregator import UNSELECTED_LOGIT
from .chunking import (
    ChunkBudget,
    chunk_slices,
    over_chunks,
    postprocess_bytes_per_class,
    sliding_merge_bytes_per_class,
    top_k_bytes_per_class,
)
from .clip import default_clip_resolution
from .clip_encoder import DenseCLIPEncoder
from .guidance import build_guidance
from .head import build_clip_encoder
from .lean_autograd import upsampled_bce, use_lean
from .top_classes import top_k_over_chunks

OUTPUTS = ("probs", "labels")  # TEST.OUTPUT / CATSeg.output


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W), align_corners=False; no-op when the size matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def sliding_window_views(image: torch.Tensor, kernel: int, stride: int, out_res: Sequence[int]) -> torch.Tensor:
    """(3, H, W) -> (L + 1, 3, k, k): the crops of the image resized to out_res, then the global view.

    The global view is resized from the original image, not from the out_res copy.
    """
    resized = resize(image[None], out_res)
    crops = F.unfold(resized, kernel_size=kernel, stride=stride)
    crops = rearrange(crops, "1 (c h w) l -> l c h w", c=image.shape[0], h=kernel)
    return torch.cat([crops, resize(image[None], (kernel, kernel))])


def crop_corners(kernel: int, stride: int, out_res: Sequence[int]) -> List[Tuple[int, int]]:
    """(top, left) of the sliding-window crops of an out_res image, in F.unfold's order (row-major)."""
    rows = range(0, out_res[0] - kernel + 1, stride)
    cols = range(0, out_res[1] - kernel + 1, stride)
    return [(y, x) for y in rows for x in cols]


def fold_crops(crops: torch.Tensor, kernel: int, stride: int, out_res: Sequence[int]) -> torch.Tensor:
    """(L, T, k, k) crops in F.unfold's order -> (T, *out_res): each crop added at its place.

    F.fold of the crops, without rearranging them into its (T k k, L) column layout first (a
    copy of every crop) and without its slow CPU kernel. The crops are added last to first: the
    order in which F.fold's CPU kernel adds them, so the sums are bit-identical
    (tests/test_sliding_merge.py)."""
    corners = crop_corners(kernel, stride, out_res)
    if len(corners) != len(crops):
        raise ValueError(f"{len(crops)} crops of {kernel} at stride {stride} do not tile {tuple(out_res)}")
    out = crops.new_zeros(crops.shape[1], *out_res)
    for (y, x), crop in reversed(list(zip(corners, crops))):
        out[:, y:y + kernel, x:x + kernel] += crop
    return out


def merge_sliding_window(probs: torch.Tensor, kernel: int, stride: int, out_res: Sequence[int],
                         fused: bool = True) -> torch.Tensor:
    """(L + 1, T, k, k) probabilities -> (T, *out_res): crops folded back and averaged where they
    overlap, then averaged with the upsampled global view. Fused: `fold_crops`, in place;
    plain: F.fold (the same values, bit for bit)."""
    local, global_view = probs[:-1], probs[-1:]
    if not fused:
        folded = F.fold(rearrange(local, "l t h w -> 1 (t h w) l"), out_res, kernel_size=kernel, stride=stride)
        ones = torch.ones(1, 1, *out_res, dtype=probs.dtype, device=probs.device)
        count = F.fold(F.unfold(ones, kernel_size=kernel, stride=stride), out_res, kernel_size=kernel, stride=stride)
        return ((folded / count + resize(global_view, out_res)) / 2)[0]
    count = fold_crops(local.new_ones(len(local), 1, kernel, kernel), kernel, stride, out_res)
    merged = fold_crops(local, kernel, stride, out_res).div_(count)
    return merged.add_(resize(global_view, out_res)[0]).div_(2)


def unselected_classes(logits: torch.Tensor) -> torch.Tensor:
    """(V, T, h, w) logits of one image's views -> (T,) bool: the classes no view selected
    (`UNSELECTED_LOGIT` everywhere in every view). Resizing, folding and averaging a constant
    map give the constant back, so such a class's output is sigmoid(UNSELECTED_LOGIT) everywhere."""
    return (logits == UNSELECTED_LOGIT).flatten(2).all(-1).all(0)


def bce_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_value: int) -> torch.Tensor:
    """Official CAT-Seg loss: per-class binary cross-entropy against one-hot targets.

    logits (B, T, h, w) are upsampled to the label size (B, H, W). Ignored pixels get all-zero
    targets and still count in the mean (official behaviour).
    """
    logits = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
    valid = targets != ignore_value
    onehot = torch.zeros_like(logits)
    onehot.permute(0, 2, 3, 1)[valid] = F.one_hot(targets[valid].long(), logits.shape[1]).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, onehot)


@META_ARCH_REGISTRY.register()
class CATSeg(nn.Module):
    """CAT-Seg: cost aggregation between dense CLIP image features and class text embeddings."""

    @configurable
    def __init__(
        self,
        *,
        guidance: nn.Module,
        sem_seg_head: nn.Module,
        size_divisibility: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        clip_pixel_mean: Sequence[float],
        clip_pixel_std: Sequence[float],
        clip_resolution: Tuple[int, int],
        backbone_resolution: Tuple[int, int],
        sliding_window: bool,
        sliding_kernel: int,
        sliding_overlap: float,
        sliding_out_res: Tuple[int, int],
        budget: Optional[ChunkBudget] = None,
        bf16: bool = False,
        train_bf16: bool = False,
        output: str = "probs",
        topk: int = 3,
    ):
        """`guidance` is a guidance source (see guidance.py). Its modules are registered here under
        their own names, which are the official top-level keys (`backbone.*` before the head, as
        in v1 checkpoints; `upsample1.*` / `upsample2.*` after it, as in CVPR'24 ones); the
        source itself is kept as a plain attribute."""
        super().__init__()
        if guidance.before_head:
            self._register_children(guidance)
        self.sem_seg_head = sem_seg_head
        if not guidance.before_head:
            self._register_children(guidance)
        object.__setattr__(self, "guidance", guidance)
        self.size_divisibility = size_divisibility
        self.clip_resolution = tuple(clip_resolution)
        self.backbone_resolution = tuple(backbone_resolution)
        self.sliding_window = sliding_window
        self.sliding_kernel = sliding_kernel
        self.sliding_stride = int(sliding_kernel * (1 - sliding_overlap))
        self.sliding_out_res = tuple(sliding_out_res)
        self.budget = budget or ChunkBudget()
        self.bf16 = bf16
        self.train_bf16 = train_bf16
        # inference output (see `forward`): "probs" (T, H, W) for evaluation, or "labels" (argmax and
        # top-`topk`, computed over class chunks without the whole probabilities)
        self.output = check_output(output, topk)
        self.topk = topk
        # fast paths: the training loss through `upsampled_bce` (plain: `bce_loss`, the same value);
        # the sliding-window merge skips the classes no view selected (plain: merges them all) and
        # adds the crops in place (plain: F.fold, bit-identical)
        self.fused = True
        for name, value in [("pixel_mean", pixel_mean), ("pixel_std", pixel_std),
                            ("clip_pixel_mean", clip_pixel_mean), ("clip_pixel_std", clip_pixel_std)]:
            self.register_buffer(name, torch.tensor(value).view(-1, 1, 1), persistent=False)

    def _register_children(self, component: nn.Module) -> None:
        for name, module in component.named_children():
            self.add_module(name, module)

    @classmethod
    def from_config(cls, cfg):
        head = cfg.MODEL.SEM_SEG_HEAD
        clip_resolution = tuple(head.CLIP_RESOLUTION) or default_clip_resolution(head.CLIP_PRETRAINED)
        encoder, tokenizer = build_clip_encoder(cfg)
        guidance = build_guidance(cfg, encoder.width, encoder.embed_dim, encoder.num_blocks)
        budget = ChunkBudget.from_config(cfg)
        sem_seg_head = SEM_SEG_HEADS_REGISTRY.get(head.NAME)(
            cfg, clip_encoder=encoder, tokenizer=tokenizer, guidance_channels=guidance.channels,
            clip_resolution=clip_resolution, budget=budget)
        return {
            "guidance": guidance,
            "sem_seg_head": sem_seg_head,
            "size_divisibility": cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "clip_pixel_mean": head.CLIP_PIXEL_MEAN,
            "clip_pixel_std": head.CLIP_PIXEL_STD,
            "clip_resolution": clip_resolution,
            "backbone_resolution": cfg.MODEL.BACKBONE_RESOLUTION,
            "sliding_window": cfg.TEST.SLIDING_WINDOW,
            "sliding_kernel": cfg.TEST.SLIDING_KERNEL,
            "sliding_overlap": cfg.TEST.SLIDING_OVERLAP,
            "sliding_out_res": cfg.TEST.SLIDING_OUT_RES,
            "budget": budget,
            "bf16": cfg.TEST.BF16,
            "train_bf16": cfg.SOLVER.AMP.ENABLED,
            "output": cfg.TEST.OUTPUT,
            "topk": cfg.TEST.TOPK,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def clip_encoder(self) -> DenseCLIPEncoder:
        return self.sem_seg_head.clip_encoder

    def unused_parameter_names(self) -> List[str]:
        """Full names of the parameters no forward pass reads (left out of DDP's reduction)."""
        prefix = next(name for name, m in self.named_modules() if m is self.clip_encoder)
        return [f"{prefix}.{name}" for name in self.clip_encoder.unused_parameter_names()]

    def normalize(self, images: List[torch.Tensor], clip: bool) -> List[torch.Tensor]:
        """(3, H, W) raw RGB images -> normalised with the CLIP or the backbone statistics."""
        mean, std = (self.clip_pixel_mean, self.clip_pixel_std) if clip else (self.pixel_mean, self.pixel_std)
        return [(x - mean) / std for x in images]

    def logits(self, views: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) raw RGB views (0-255, unpadded sliding-window crops) -> (N, T, h, w) logits.

        Each view is normalised with the CLIP statistics and resized to the CLIP resolution, and,
        for a guidance source that reads the image, with the backbone statistics to the
        backbone resolution.
        """
        clip_in = resize((views - self.clip_pixel_mean) / self.clip_pixel_std, self.clip_resolution)
        backbone_in = None
        if self.guidance.needs_image:
            backbone_in = resize((views - self.pixel_mean) / self.pixel_std, self.backbone_resolution)
        return self.run_network(clip_in, backbone_in)

    def run_network(self, clip_in: torch.Tensor, backbone_in: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Normalised, resized inputs -> (N, T, 4h, 4w) logits (fp32).

        The network runs under bfloat16 autocast in training with `train_bf16`
        (SOLVER.AMP.ENABLED) and at inference with `bf16` (TEST.BF16): faster, approximate.
        Only this forward is autocast: the loss (on the fp32 logits) is computed, and backward()
        and the optimizer step are called, outside it; parameters, gradients and optimizer state
        stay fp32 (no GradScaler: bfloat16 has float32's exponent range).
        """
        bf16 = self.train_bf16 if self.training else self.bf16
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        with autocast:
            features = self.clip_encoder(clip_in, self.guidance.clip_blocks)
            guidance = self.guidance(features, backbone_in)
            logits = self.sem_seg_head(features["dense"], guidance)
        return logits.float()

    def forward(self, batched_inputs: List[Dict], output: Optional[str] = None, topk: Optional[int] = None):
        """
        Args:
            batched_inputs: detectron2 dicts with "image" (3, H, W) RGB 0-255, optionally "height",
                "width" (output size) and, in training, "sem_seg" (H, W) labels.
            output: inference output, "probs" or "labels" (default `self.output`, TEST.OUTPUT).
            topk: k of the "labels" output (default `self.topk`, TEST.TOPK); at most T is kept.
        Returns:
            training: {"loss_sem_seg": scalar};
            inference, "probs": [{"sem_seg": (T, height, width) probabilities}] (what evaluation reads);
            inference, "labels": [{"sem_seg_labels": (height, width) int64 = probs.argmax(0),
                "sem_seg_topk_scores": (k, height, width) float32 = probs.topk(k, dim=0).values,
                "sem_seg_topk_classes": (k, height, width) int64, their class ids, lower id first
                among equal scores}], computed over class chunks (catseg/modeling/top_classes.py):
                the (T, height, width) probabilities are never allocated.
        """
        images = [x["image"].to(self.device).float() for x in batched_inputs]
        if self.training:
            return self.training_loss(images, [x["sem_seg"].to(self.device) for x in batched_inputs])
        sizes = [(x.get("height", im.shape[-2]), x.get("width", im.shape[-1])) for x, im in zip(batched_inputs, images)]
        with torch.no_grad():  # cached text features must be ordinary tensors, usable in training later
            self.sem_seg_head.predictor.text_features()
        topk = self.topk if topk is None else topk
        k = None if check_output(self.output if output is None else output, topk) == "probs" else topk
        with torch.inference_mode():
            if self.sliding_window:
                outputs = self.inference_sliding_window(images, sizes, k)
            else:
                outputs = self.inference_whole_image(images, sizes, k)
        return [{"sem_seg": out} if k is None else out for out in outputs]

    def training_loss(self, images: List[torch.Tensor], labels: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Images are padded to a common size as one ImageList (official); labels with the ignore value."""
        ignore = self.sem_seg_head.ignore_value
        clip_in = ImageList.from_tensors(self.normalize(images, clip=True), self.size_divisibility).tensor
        backbone_in = None
        if self.guidance.needs_image:
            backbone_in = ImageList.from_tensors(self.normalize(images, clip=False), self.size_divisibility).tensor
            backbone_in = resize(backbone_in, self.backbone_resolution)
        targets = ImageList.from_tensors(labels, self.size_divisibility, pad_value=ignore).tensor
        logits = self.run_network(resize(clip_in, self.clip_resolution), backbone_in)
        lean = self.fused and use_lean(logits)
        loss = upsampled_bce(logits, targets, ignore) if lean else bce_loss(logits, targets, ignore)
        return {"loss_sem_seg": loss}

    def inference_whole_image(self, images: List[torch.Tensor], sizes: List[Tuple[int, int]],
                              topk: Optional[int] = None) -> List[Union[torch.Tensor, Dict[str, torch.Tensor]]]:
        """Each image is normalised, padded to its own multiple of SIZE_DIVISIBILITY and resized.

        Post-processing crops the logit map to the unpadded image size (in logit pixels that
        crop is a no-op for images over the logit resolution, so the padding border stretches
        into the output: the official quirk) and resizes to (height, width). With `topk`, it runs
        over class chunks (MEMORY_BUDGET_MB, CPU_CHUNK_MB) into a running top-k: per image the
        "labels" output dict of `forward` instead of the (T, height, width) probabilities.
        """
        def network_input(normalised: List[torch.Tensor], size: Tuple[int, int]) -> torch.Tensor:
            return torch.stack([resize(pad_to_multiple(x, self.size_divisibility)[None], size)[0] for x in normalised])
        clip_in = network_input(self.normalize(images, clip=True), self.clip_resolution)
        backbone_in = None
        if self.guidance.needs_image:
            backbone_in = network_input(self.normalize(images, clip=False), self.backbone_resolution)
        probs = self.run_network(clip_in, backbone_in).sigmoid()
        if topk is None:
            return [sem_seg_postprocess(p, x.shape[-2:], h, w) for p, x, (h, w) in zip(probs, images, sizes)]
        outputs = []
        for p, x, (h, w) in zip(probs, images, sizes):
            def post(s: slice) -> torch.Tensor:  # called right away
                return sem_seg_postprocess(p[s], x.shape[-2:], h, w)
            chunk = self.budget.items(len(p), postprocess_bytes_per_class((h, w)), p.device)
            merge_chunk = self.budget.items(len(p), top_k_bytes_per_class((h, w)), p.device)
            ids = torch.arange(len(p), device=p.device)
            outputs.append(top_k_over_chunks(post, ids, chunk, topk, (h, w), merge_chunk=merge_chunk).output())
        return outputs

    def inference_sliding_window(self, images: List[torch.Tensor], sizes: List[Tuple[int, int]],
                                 topk: Optional[int] = None) -> List[Union[torch.Tensor, Dict[str, torch.Tensor]]]:
        """Overlapping crops of each image (resized to SLIDING_OUT_RES) plus a global view, all
        images' views in one network pass; see `merge_sliding_window`.

        Merging and post-processing are per class, so they run over class chunks sized by
        MEMORY_BUDGET_MB (and CPU_CHUNK_MB): only the (T, height, width) output is ever whole,
        and with `topk` not even that: the chunks go into a running top-k (per image the "labels"
        output dict of `forward`). Fused (`fused`), a class no view selected (CVPR'24 above
        CLASS_PAD_LENGTH classes, see `unselected_classes`) is not merged: its output is written
        as the constant (with `topk`: the lowest such ids are merged as constant candidates).
        """
        k, stride, out_res = self.sliding_kernel, self.sliding_stride, self.sliding_out_res
        views = [sliding_window_views(x, k, stride, out_res) for x in images]
        logits = self.logits(torch.cat(views)).split([len(v) for v in views])
        outputs = []
        for lg, (h, w) in zip(logits, sizes):
            def merge(s) -> torch.Tensor:  # s: a slice or index tensor of classes; called right away
                probs = resize(lg[:, s], (k, k)).sigmoid_()
                merged = merge_sliding_window(probs, k, stride, out_res, fused=self.fused)
                return sem_seg_postprocess(merged, out_res, h, w)
            unselected = unselected_classes(lg) if self.fused else None
            kept = None if unselected is None else (~unselected).nonzero()[:, 0]
            total = lg.shape[1] if kept is None else len(kept)
            chunk = self.budget.items(total, sliding_merge_bytes_per_class(len(lg), k, out_res, (h, w)), lg.device)
            constant = lg.new_tensor(UNSELECTED_LOGIT).sigmoid().item()
            if topk is not None:  # the probabilities path's chunks, as it computes them, into a running top-k
                every = kept is None or total == lg.shape[1]
                ids = torch.arange(lg.shape[1], device=lg.device) if every else kept
                skipped = None if every else unselected.nonzero()[:, 0]
                merge_chunk = self.budget.items(total, top_k_bytes_per_class((h, w)), lg.device)
                top = top_k_over_chunks(merge if every else lambda s: merge(kept[s]), ids, chunk, topk, (h, w),
                                        constant=constant, constant_ids=skipped, merge_chunk=merge_chunk)
                outputs.append(top.output())
                continue
            if kept is None or total == lg.shape[1]:
                outputs.append(over_chunks(merge, lg.shape[1], chunk, dim=0))
                continue
            out = lg.new_empty((lg.shape[1], h, w)).index_fill_(0, unselected.nonzero()[:, 0], constant)
            for s in chunk_slices(total, chunk):
                out.index_copy_(0, kept[s], merge(kept[s]))
            outputs.append(out)
        return outputs


def check_output(output: str, topk: int) -> str:
    """`output` if it is one of OUTPUTS and `topk` >= 1, else ValueError."""
    if output not in OUTPUTS:
        raise ValueError(f"inference output {output!r} (TEST.OUTPUT): expected one of {', '.join(OUTPUTS)}")
    if topk < 1:
        raise ValueError(f"TEST.TOPK {topk}: expected at least 1")
    return output


@contextmanager
def full_probabilities(model: nn.Module) -> Iterator[None]:
    """Every CATSeg inside `model` (a DDP or test-time-augmentation wrapper included) outputs the
    (T, H, W) probabilities meanwhile, whatever TEST.OUTPUT says: evaluation needs them."""
    nets = [m for m in model.modules() if isinstance(m, CATSeg)]
    saved = [m.output for m in nets]
    for m in nets:
        m.output = "probs"
    try:
        yield
    finally:
        for m, output in zip(nets, saved):
            m.output = output
