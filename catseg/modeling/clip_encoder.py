"""DenseCLIPEncoder: an open_clip CLIP that returns dense image features and named block outputs.

The encoder takes over the parts of a built open_clip ``CLIP`` under their open_clip names
(`visual`, `transformer`, `token_embedding`, `positional_embedding`, `ln_final`,
`text_projection`, `logit_scale`), so its state_dict is the CLIP's (OpenAI key layout) and
official CAT-Seg checkpoints load into it unchanged at `sem_seg_head.predictor.clip_model`.

Options (the differences between the releases; see `DENSE_BLOCKS`, `split_qkv_`, `FINETUNE_RULES`):
- dense last block: "v1" (x + out_proj(v)) or "cvpr24" (class-token residual);
- attention weights: "packed" (`in_proj_weight`) or "split" (`q/k/v_proj_weight`, CVPR'24);
- intermediate outputs: the residual stream after any vision blocks (CVPR'24 guidance);
- `fused`: blocks through PyTorch's fused attention kernel, with in-place activations at
  inference and, in training, the pre-norm projections and the MLP through `lean_autograd`
  (normalised tokens and MLP activations recomputed in the backward pass instead of stored);
  `fused = False` runs open_clip's own block forward (the reference computation).

Notation: B images, h x w patch grid, W vision width, C embedding channels.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, text_global_pool
from torch import nn

from . import inplace
from .epilogue_linear import apply_linear, linear
from .lean_autograd import norm_linear, norm_mlp, use_lean


def resize_positional_embedding(pos: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Resize CLIP's (1 + s*s, W) positional embedding to a (1 + h*w, W) one.

    The class position is kept; the square patch grid is resized with bicubic interpolation
    (align_corners=False). Returned unchanged when the grid already matches.
    """
    side = int(math.sqrt(pos.shape[0] - 1))
    if (side, side) == tuple(grid):
        return pos
    patch = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=grid, mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], patch.flatten(2).squeeze(0).t()], dim=0)


def split_qkv_(attn: nn.MultiheadAttention) -> None:
    """Replace `in_proj_weight` (3D, D) by `q_proj_weight`, `k_proj_weight`, `v_proj_weight`
    (D, D each; in_proj_weight = their concatenation), in place. `in_proj_bias` stays packed.
    nn.MultiheadAttention computes the same with either layout."""
    if not attn._qkv_same_embed_dim:
        return
    q, k, v = attn.in_proj_weight.detach().chunk(3)
    attn.register_parameter("in_proj_weight", None)
    attn._qkv_same_embed_dim = False
    for name, w in (("q_proj_weight", q), ("k_proj_weight", k), ("v_proj_weight", v)):
        setattr(attn, name, nn.Parameter(w.clone()))


def qkv_weight(attn: nn.MultiheadAttention) -> torch.Tensor:
    """The (3D, D) packed input-projection weight of either layout."""
    if attn._qkv_same_embed_dim:
        return attn.in_proj_weight
    return torch.cat([attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight])


def value_weight(attn: nn.MultiheadAttention) -> torch.Tensor:
    """The (D, D) value-projection weight of either layout."""
    if attn._qkv_same_embed_dim:
        return attn.in_proj_weight[2 * attn.embed_dim:]
    return attn.v_proj_weight


def block_mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's c_fc -> activation -> c_proj; QuickGELU / GELU run in place without autograd."""
    if not hasattr(mlp, "c_fc"):
        return mlp(x)
    act = mlp.gelu
    if type(act) is QuickGELU:
        act_ = inplace.quick_gelu_
    elif type(act) is nn.GELU and act.approximate == "none":
        act_ = torch.ops.aten.gelu_
    else:
        act_ = act
    return inplace.mlp(mlp.c_fc, mlp.c_proj, x, act, act_)


def lean_activation(mlp: nn.Module) -> Optional[str]:
    """The `lean_autograd.norm_mlp` activation of an open_clip MLP (c_fc, gelu, c_proj), or None."""
    if not hasattr(mlp, "c_fc") or not isinstance(mlp.c_fc, nn.Linear):
        return None
    act = mlp.gelu
    if type(act) is QuickGELU:
        return "quick_gelu"
    if type(act) is nn.GELU and act.approximate == "none":
        return "gelu"
    return None


def fusable(block: nn.Module) -> bool:
    """Whether `fused_block` computes exactly what this open_clip block's own forward computes."""
    attn = getattr(block, "attn", None)
    return (isinstance(attn, nn.MultiheadAttention) and attn.batch_first and attn.in_proj_bias is not None
            and attn.dropout == 0.0 and isinstance(getattr(block, "ln_attn", nn.Identity()), nn.Identity))


def fused_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One open_clip ResidualAttentionBlock on (B, N, W) tokens, attention through the fused
    `scaled_dot_product_attention`, MLP activation in place at inference."""
    attn = block.attn
    b, n, c = x.shape
    lean = use_lean(x)
    if lean:
        qkv = norm_linear(x, block.ln_1, qkv_weight(attn), attn.in_proj_bias)
    else:
        qkv = linear(block.ln_1(x), qkv_weight(attn), attn.in_proj_bias)
    q, k, v = qkv.view(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, d)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
    x = x + block.ls_1(apply_linear(attn.out_proj, out))
    activation = lean and lean_activation(block.mlp)
    if activation:
        return x + block.ls_2(norm_mlp(x, block.ln_2, block.mlp.c_fc, block.mlp.c_proj, activation=activation))
    return x + block.ls_2(block_mlp(block.mlp, block.ln_2(x)))


def value_path(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """out_proj(value projection of ln_1(x)): the dense last block's attention, (B, N, W)."""
    attn = block.attn
    width = x.shape[-1]
    v = linear(block.ln_1(x), value_weight(attn), attn.in_proj_bias[2 * width:])
    return block.ls_1(apply_linear(attn.out_proj, v))


def dense_block_v1(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """CAT-Seg v1 dense last block: x + out_proj(v), then the MLP residual."""
    x = x + value_path(block, x)
    return x + block.ls_2(block_mlp(block.mlp, block.ln_2(x)))


def dense_block_cvpr24(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """CAT-Seg CVPR'24 dense last block: out_proj(v) plus the block input's class token
    (broadcast to every token), then the MLP residual."""
    x = value_path(block, x) + x[:, :1]
    return x + block.ls_2(block_mlp(block.mlp, block.ln_2(x)))


DENSE_BLOCKS = {"v1": dense_block_v1, "cvpr24": dense_block_cvpr24}

# CLIP_FINETUNE: which CLIP parameters train, by their name in the encoder.
FINETUNE_RULES = {
    # v1 "attention": the visual tower's attention and positional parameters.
    "attention": lambda n: n.startswith("visual.") and ("attn" in n or "position" in n),
    # v1 "full": the whole visual tower.
    "full": lambda n: n.startswith("visual."),
    # visual prompt tokens only.
    "prompt": lambda n: n.startswith("visual.") and "prompt" in n,
    # CVPR'24 "attention": q and v projection weights of every block of both towers (split layout).
    "qv": lambda n: "transformer" in n and n.endswith(("attn.q_proj_weight", "attn.v_proj_weight")),
    # CVPR'24 "full": every block parameter of both towers.
    "blocks": lambda n: "transformer.resblocks" in n,
    "none": lambda n: False,
}


class DenseCLIPEncoder(nn.Module):
    """open_clip CLIP with a dense image pass and text encoding of any length up to the context.

    Args:
        clip: a built open_clip ``CLIP`` (its parts are taken over, not copied).
        dense_block: rule of the dense last vision block, a key of `DENSE_BLOCKS`.
        attn_weights: "packed" or "split" attention input-projection weights (both towers).
        fused: see the module docstring.
    """

    def __init__(self, clip: nn.Module, dense_block: str = "v1", attn_weights: str = "packed", fused: bool = True):
        super().__init__()
        if type(clip) is not open_clip.CLIP:
            raise TypeError(f"DenseCLIPEncoder needs an open_clip CLIP model, got {type(clip).__name__}")
        if dense_block not in DENSE_BLOCKS:
            raise ValueError(f"CLIP_DENSE_BLOCK {dense_block!r}: expected one of {sorted(DENSE_BLOCKS)}")
        if attn_weights not in ("packed", "split"):
            raise ValueError(f"CLIP_ATTN_WEIGHTS {attn_weights!r}: expected 'packed' or 'split'")
        # Parameters first, then modules: the official key order.
        self.positional_embedding = clip.positional_embedding
        self.text_projection = clip.text_projection
        self.logit_scale = clip.logit_scale
        self.visual = clip.visual
        self.transformer = clip.transformer
        self.token_embedding = clip.token_embedding
        self.ln_final = clip.ln_final
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self.context_length = clip.context_length
        self.text_pool_type = clip.text_pool_type
        self.text_eos_id = clip.text_eos_id
        self.dense_block = dense_block
        self.attn_weights = attn_weights
        self.fused = fused
        if attn_weights == "split":
            for module in self.modules():
                if isinstance(module, nn.MultiheadAttention):
                    split_qkv_(module)

    @property
    def width(self) -> int:
        """Vision width W (channels of the intermediate block outputs)."""
        return self.visual.transformer.width

    @property
    def embed_dim(self) -> int:
        """Embedding size C shared by the image and text features."""
        return self.visual.proj.shape[1]

    @property
    def patch_size(self) -> Tuple[int, int]:
        return tuple(self.visual.conv1.kernel_size)

    @property
    def num_blocks(self) -> int:
        return len(self.visual.transformer.resblocks)

    def grid(self, image_size: Sequence[int]) -> Tuple[int, int]:
        """Patch grid (h, w) of an input of `image_size` (H, W)."""
        ph, pw = self.patch_size
        return image_size[0] // ph, image_size[1] // pw

    def set_finetune(self, mode: str) -> None:
        """requires_grad per CLIP_FINETUNE (a key of FINETUNE_RULES)."""
        if mode not in FINETUNE_RULES:
            raise ValueError(f"CLIP_FINETUNE {mode!r}: expected one of {sorted(FINETUNE_RULES)}")
        if mode == "qv" and self.attn_weights != "split":
            raise ValueError("CLIP_FINETUNE 'qv' trains q and v separately: it needs CLIP_ATTN_WEIGHTS 'split'")
        for name, param in self.named_parameters():
            param.requires_grad = FINETUNE_RULES[mode](name)

    def unused_parameter_names(self) -> List[str]:
        """Parameters the forward passes never read: the dense last block discards its queries
        and keys, which only the split layout keeps as parameters of their own."""
        if self.attn_weights != "split":
            return []
        last = f"visual.transformer.resblocks.{self.num_blocks - 1}.attn"
        return [f"{last}.q_proj_weight", f"{last}.k_proj_weight"]

    @property
    def text_trainable(self) -> bool:
        """Whether any text-tower parameter trains (then text embeddings need gradients)."""
        return any(p.requires_grad for n, p in self.named_parameters() if not n.startswith("visual."))

    def add_visual_prompts(self, depth: int, length: int) -> None:
        """Register `visual.transformer.prompt_tokens` (depth, length, W), Xavier-uniform."""
        if depth <= 0 or length <= 0:
            return
        prompts = torch.empty(depth, length, self.width)
        nn.init.xavier_uniform_(prompts)
        self.visual.transformer.prompt_tokens = nn.Parameter(prompts)

    def forward(self, images: torch.Tensor, blocks: Sequence[int] = ()) -> Dict[str, torch.Tensor]:
        """Dense image features (see `dense_features`), through `forward_fused` or `forward_plain`."""
        if self.fused:
            return self.forward_fused(images, blocks)
        return self.forward_plain(images, blocks)

    def forward_fused(self, images: torch.Tensor, blocks: Sequence[int] = ()) -> Dict[str, torch.Tensor]:
        """Every block that allows it (`fusable`) through `fused_block`."""
        return self.dense_features(images, blocks, lambda b, x: fused_block(b, x) if fusable(b) else b(x))

    def forward_plain(self, images: torch.Tensor, blocks: Sequence[int] = ()) -> Dict[str, torch.Tensor]:
        """Every block through open_clip's own forward."""
        return self.dense_features(images, blocks, lambda b, x: b(x))

    def dense_features(self, images: torch.Tensor, blocks: Sequence[int], run_block) -> Dict[str, torch.Tensor]:
        """Dense image features, each residual block but the last run by `run_block(block, x)`.

        Args:
            images: (B, 3, H, W), CLIP-normalised.
            blocks: 0-based vision blocks whose outputs to return.
        Returns:
            "dense": (B, C, h, w), the patch tokens after the dense last block, ln_post and proj;
            f"block{i}" for i in `blocks`: (B, W, h, w), the residual stream after block i
            (no ln_post, no proj). The class token and any visual prompts are dropped.
        """
        visual = self.visual
        x = visual.conv1(images)  # (B, W, h, w)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + resize_positional_embedding(visual.positional_embedding, grid).to(x.dtype)
        x = visual.ln_pre(x)

        def patch_map(tokens: torch.Tensor) -> torch.Tensor:
            return tokens[:, 1 + n_prompt:].transpose(1, 2).unflatten(2, grid)

        prompts = getattr(visual.transformer, "prompt_tokens", None)
        resblocks = visual.transformer.resblocks
        n_prompt, out = 0, {}
        for i, block in enumerate(resblocks):
            if prompts is not None and i < prompts.shape[0]:
                p = prompts[i].to(x.dtype).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], p, x[:, 1 + n_prompt:]], dim=1)
                n_prompt = p.shape[1]
            if i == len(resblocks) - 1:
                x = DENSE_BLOCKS[self.dense_block](block, x)
            else:
                x = run_block(block, x)
            if i in blocks:
                out[f"block{i}"] = patch_map(x)
        out["dense"] = patch_map(visual.ln_post(x) @ visual.proj)
        return out

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids, L <= context length -> (N, C) unnormalised text features.

        Equal to open_clip's `CLIP.encode_text` on the 77-token input when L covers every
        end-of-text token (the text transformer is causal).
        """
        length = tokens.shape[1]
        dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(tokens).to(dtype) + self.positional_embedding[:length].to(dtype)
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
        x = text_global_pool(self.ln_final(x), tokens, self.text_pool_type, eos_token_id=self.text_eos_id)
        projection = self.text_projection
        return projection(x) if isinstance(projection, nn.Module) else x @ projection
