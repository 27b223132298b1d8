"""effkern.ops.sample_keep: packed, sorted, reproducible token-dropout indices."""

from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message="effkern: the compiled extension")

from effkern.ops import sample_keep  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def check_layout(keep_idx, cu, B, L, counts):
    assert keep_idx.dtype == torch.int64 and keep_idx.dim() == 1
    assert cu.dtype == torch.int32 and cu.shape == (B + 1,)
    cu = cu.cpu().long()
    keep_idx = keep_idx.cpu()
    assert cu[0] == 0 and cu[-1] == keep_idx.numel()
    assert torch.equal(cu.diff(), torch.as_tensor(counts).long())
    for b in range(B):
        seg = keep_idx[cu[b]:cu[b + 1]]
        assert seg.numel() >= 1
        assert (seg >= 0).all() and (seg < L).all()
        assert (seg.diff() > 0).all()  # sorted, unique


@pytest.mark.parametrize("B,L,keep", [(4, 196, 0.5), (3, 49, 0.25), (2, 16, 1.0), (5, 9, 0.01), (1, 1, 0.3),
                                      (3, 144, 0.75), (2, 10, 0.999)])
def test_ratio(B, L, keep):
    keep_idx, cu = sample_keep(B, L, keep, generator=torch.Generator().manual_seed(0))
    n = max(1, int(L * keep))
    check_layout(keep_idx, cu, B, L, [n] * B)
    if n == L:
        assert torch.equal(keep_idx, torch.arange(L).repeat(B))


def test_ratio_matches_timm_count():
    # timm PatchDropout: num_keep = max(1, int(L * (1 - prob)))
    for L in (1, 7, 49, 196, 576):
        for keep in (0.1, 0.25, 0.5, 0.75, 0.9):
            keep_idx, cu = sample_keep(2, L, keep)
            assert int(cu[1]) == max(1, int(L * keep))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_counts_ragged(dtype):
    gen = torch.Generator().manual_seed(1)
    L = 37
    counts = torch.tensor([1, L, 5, 20, 1, 36], dtype=dtype)
    keep_idx, cu = sample_keep(6, L, counts, generator=gen)
    check_layout(keep_idx, cu, 6, L, counts)
    assert torch.equal(keep_idx[cu[1]:cu[2]], torch.arange(L))  # all tokens kept


def test_reproducible_and_random():
    a = sample_keep(8, 64, 0.5, generator=torch.Generator().manual_seed(3))
    b = sample_keep(8, 64, 0.5, generator=torch.Generator().manual_seed(3))
    c = sample_keep(8, 64, 0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    counts = torch.tensor([3, 60, 1, 64])
    a = sample_keep(4, 64, counts, generator=torch.Generator().manual_seed(3))
    b = sample_keep(4, 64, counts, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0])


def test_uniform_marginals():
    gen = torch.Generator().manual_seed(5)
    L, B = 16, 4000
    keep_idx, cu = sample_keep(B, L, 0.25, generator=gen)
    freq = torch.bincount(keep_idx, minlength=L).double() / B
    assert (freq - 0.25).abs().max() < 0.03
    keep_idx, cu = sample_keep(B, L, torch.full((B,), 12), generator=gen)
    freq = torch.bincount(keep_idx, minlength=L).double() / B
    assert (freq - 0.75).abs().max() < 0.03


@pytest.mark.parametrize("keep,match", [
    (0.0, "keep"), (1.5, "keep"), (-0.2, "keep"), (True, "keep"), ("half", "keep"),
    (torch.tensor([0, 3]), "keep counts"), (torch.tensor([3, 17]), "keep counts"),
    (torch.tensor([3, 3, 3]), "keep counts"), (torch.tensor([1.0, 2.0]), "keep counts"),
])
def test_bad_keep(keep, match):
    with pytest.raises(ValueError, match=match):
        sample_keep(2, 16, keep)


def test_bad_sizes():
    with pytest.raises(ValueError, match="batch"):
        sample_keep(0, 16, 0.5)
    with pytest.raises(ValueError, match="num_patches"):
        sample_keep(2, 0, 0.5)


@cuda
def test_cuda_ratio_and_counts():
    gen = torch.Generator(device="cuda").manual_seed(0)
    keep_idx, cu = sample_keep(4, 196, 0.5, generator=gen)
    assert keep_idx.is_cuda and cu.is_cuda
    check_layout(keep_idx, cu, 4, 196, [98] * 4)
    counts = torch.tensor([1, 196, 50, 7])
    keep_idx, cu = sample_keep(4, 196, counts, generator=gen)
    assert keep_idx.is_cuda
    check_layout(keep_idx, cu, 4, 196, counts)
    keep_idx, cu = sample_keep(4, 196, counts.cuda(), device="cuda")
    check_layout(keep_idx, cu, 4, 196, counts)
