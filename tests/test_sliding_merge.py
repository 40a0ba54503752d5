"""The sliding-window merge: `fold_crops` (crops added in place) against F.fold, bit for bit,
and the fused merge against the plain one (F.fold), for overlapping and tiling geometries."""
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from catseg.modeling.meta_arch import crop_corners, fold_crops, merge_sliding_window

# (kernel, stride, out_res): the official geometry (4 crops, a 4-fold centre), a 3 x 4 grid with
# overlaps, crops that tile without overlap, and a stride that leaves a border uncovered
GEOMETRIES = [(384, 256, (640, 640)), (4, 2, (8, 10)), (4, 4, (8, 8)), (5, 3, (12, 12))]


def random_crops(count: int, classes: int, kernel: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, classes, kernel, kernel, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kernel,stride,out_res", GEOMETRIES)
def test_fold_crops_is_f_fold_bit_for_bit(kernel, stride, out_res):
    classes = 2 if kernel > 100 else 5
    crops = random_crops(len(crop_corners(kernel, stride, out_res)), classes, kernel)
    reference = F.fold(rearrange(crops, "l t h w -> 1 (t h w) l"), out_res, kernel_size=kernel, stride=stride)[0]
    assert torch.equal(fold_crops(crops, kernel, stride, out_res), reference)


@pytest.mark.parametrize("kernel,stride,out_res", GEOMETRIES[:3])
def test_fused_merge_is_the_plain_merge_bit_for_bit(kernel, stride, out_res):
    classes = 2 if kernel > 100 else 5
    probs = random_crops(len(crop_corners(kernel, stride, out_res)) + 1, classes, kernel, seed=1)
    fused = merge_sliding_window(probs, kernel, stride, out_res)
    plain = merge_sliding_window(probs, kernel, stride, out_res, fused=False)
    assert fused.shape == (classes, *out_res) and torch.equal(fused, plain)


def test_crop_corners_follow_unfold_order():
    assert crop_corners(384, 256, (640, 640)) == [(0, 0), (0, 256), (256, 0), (256, 256)]
    # F.unfold's column l of a numbered image holds the crop at corner l
    image = torch.arange(8 * 10, dtype=torch.float32).view(1, 1, 8, 10)
    columns = F.unfold(image, kernel_size=4, stride=2)[0]
    for l, (y, x) in enumerate(crop_corners(4, 2, (8, 10))):
        assert torch.equal(columns[:, l], image[0, 0, y:y + 4, x:x + 4].reshape(-1))


def test_wrong_number_of_crops_is_one_error():
    with pytest.raises(ValueError, match="3 crops of 4 at stride 2 do not tile"):
        fold_crops(random_crops(3, 1, 4), 4, 2, (8, 8))
