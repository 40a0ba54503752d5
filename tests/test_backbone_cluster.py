"""Acceptance 2 (Cluster attention: exact fallback, flash-attn selection) and the Cluster
backbone's native key layout against the committed manifests."""
import os
from pathlib import Path

import pytest
import torch

from catseg.modeling.backbone import cluster
from catseg.modeling.backbone.cluster import VARIANTS, Cluster, Clustering

MANIFESTS = Path(cluster.__file__).parent / "manifests"


def naive_attention(q, k, v):
    """softmax(QK^T / sqrt(d)) V, (B, L, heads, d) layout, written out."""
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("bhqk,bkhd->bqhd", logits.softmax(dim=-1), v)


def test_fallback_equals_naive_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 2, 24), torch.randn(3, 37, 2, 24), torch.randn(3, 37, 2, 24)
    expected = naive_attention(q, k, v)
    torch.testing.assert_close(cluster.attention_torch(q, k, v), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(cluster.attention(q, k, v), expected, atol=1e-5, rtol=0)


def test_without_flash_attn_the_torch_path_runs(monkeypatch):
    monkeypatch.setattr(cluster, "flash_attn_func", None)
    assert not cluster.use_flash(torch.zeros(1, dtype=torch.float16))
    layer = Clustering(16, 16, window=(5, 5), heads=2, head_dim=8, num_clustering=2)
    out = layer(torch.randn(2, 16, 11, 13))  # 11 x 13 is not a multiple of the 5 x 5 regions
    assert out.shape == (2, 16, 11, 13) and torch.isfinite(out).all()


def test_flash_is_not_used_for_cpu_or_fp32(monkeypatch):
    def fail(*args):
        raise AssertionError("flash_attn_func called on CPU / fp32 tensors")

    monkeypatch.setattr(cluster, "flash_attn_func", fail)
    q = torch.randn(1, 4, 2, 8)
    torch.testing.assert_close(cluster.attention(q, q, q), naive_attention(q, q, q), atol=1e-5, rtol=0)


@pytest.mark.skipif(cluster.flash_attn_func is None, reason="flash-attn is not installed")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn needs a CUDA device")
def test_flash_matches_fallback_on_cuda():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, n, 4, 32, device="cuda", dtype=torch.float16) for n in (4, 144, 144))
    assert cluster.use_flash(q, k, v)
    torch.testing.assert_close(cluster.attention(q, k, v).float(), naive_attention(q.float(), k.float(), v.float()),
                               atol=2e-3, rtol=0)


def test_regions_cluster_independently():
    """A 6 x 7 map with 4 x 4 regions (padded to 8 x 8): the full top-left region equals
    clustering that crop alone, and the padded map comes back at its own size."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 7)
    layer = Clustering(8, 8, centers=(2, 2), window=(4, 4), heads=2, head_dim=8, num_clustering=2)
    with torch.no_grad():
        full, alone = layer(x), layer(x[..., :4, :4])
    assert full.shape == x.shape and torch.isfinite(full).all()
    torch.testing.assert_close(full[..., :4, :4], alone, atol=1e-5, rtol=1e-5)


def test_masked_pool_ignores_invalid_points():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    valid = torch.zeros(1, 1, 4, 4)
    valid[..., :3, :3] = 1
    pooled = cluster.masked_pool(x, valid, (2, 2))
    expected = torch.tensor([[0 + 1 + 4 + 5, 2 + 6], [8 + 9, 10]]) / torch.tensor([[4.0, 2.0], [2.0, 1.0]])
    torch.testing.assert_close(pooled[0, 0], expected)


def manifest_text(variant: str) -> str:
    """'key<TAB>shape' lines of the variant's full (4-stage) Cluster state_dict."""
    state = Cluster(VARIANTS[variant]).state_dict()
    return "".join(f"{k}\t{','.join(map(str, v.shape))}\n" for k, v in state.items())


@pytest.mark.parametrize("variant", ["cluster_tiny", "cluster_small"])
def test_native_keys_match_manifest(variant):
    """Set CATSEG_WRITE_MANIFESTS=1 to (re)write the manifests after a deliberate layout change."""
    path = MANIFESTS / f"{variant}.tsv"
    if os.environ.get("CATSEG_WRITE_MANIFESTS") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(manifest_text(variant))
    assert manifest_text(variant) == path.read_text()


@pytest.mark.parametrize("variant, millions", [("cluster_tiny", (4.0, 6.0)), ("cluster_small", (12.0, 16.0))])
def test_variant_sizes_are_coc_like(variant, millions):
    """The variants are CoC-Tiny / CoC-Small sized (about 5 M and 14 M parameters)."""
    n = sum(p.numel() for p in Cluster(VARIANTS[variant]).parameters()) / 1e6
    assert millions[0] < n < millions[1]
