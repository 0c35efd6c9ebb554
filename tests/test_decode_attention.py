"""optpass's CPU decode attention kernel against an independent reference (explicit softmax over repeated heads)."""

from __future__ import annotations

import pytest
import torch

from optpass.backends.cpu import gemv_ops
from optpass.backends.cpu.decode_attention import attend

pytestmark = pytest.mark.skipif(not gemv_ops.available(), reason="optpass C++ kernels not built here")

B, HQ, HKV, L, D = 2, 9, 3, 600, 64


def reference(q, k, v, mask, scale, softcap=None):
    k, v = k.repeat_interleave(HQ // HKV, 1).double(), v.repeat_interleave(HQ // HKV, 1).double()
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)  # a row hidden everywhere: 0
    return (weights @ v).transpose(1, 2).float()


def inputs(rows: int, seed: int = 0, dim: int = D):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, dim, generator=g) for h, n in ((HQ, rows), (HKV, L), (HKV, L)))
    mask = torch.zeros(B, 1, rows, L, dtype=torch.bool)
    for b, (start, end) in enumerate(((0, 431), (37, 290))):  # left padding, then a causal block of `rows`
        for i in range(rows):
            mask[b, 0, i, start:end + i] = True
    return q, k, v, mask


@pytest.mark.parametrize("rows", [1, 6])
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_matches_reference_attention(rows, softcap):
    q, k, v, mask = inputs(rows)
    got = attend(q, k, v, mask, 0.125, softcap)
    assert got.shape == (B, rows, HQ, D)
    torch.testing.assert_close(got, reference(q, k, v, mask, 0.125, softcap), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 6])
def test_hidden_slots_are_never_read(rows):
    """NaNs in slots the mask hides from every row (a static cache's unused tail) do not reach the output."""
    q, k, v, mask = inputs(rows)
    k[:, :, 500:], v[:, :, 500:] = float("nan"), float("nan")
    assert not attend(q, k, v, mask, 0.125).isnan().any()


@pytest.mark.parametrize("rows, dim", [(6, 64), (5, 256)])  # 18 / 15 rows per KV head: whole and partial blocks
def test_rows_are_bit_identical_to_single_row_calls(rows, dim):
    """Rows share each key / value load, but a row's result must not depend on the others: a slot hidden from
    one row (the causal tail) is still read for the rows that see it."""
    q, k, v, mask = inputs(rows, seed=1, dim=dim)
    together = attend(q, k, v, mask, dim ** -0.5)
    torch.testing.assert_close(together, reference(q, k, v, mask, dim ** -0.5), atol=2e-6, rtol=1e-5)
    for i in range(rows):
        alone = attend(q[:, :, i:i + 1], k, v, mask[:, :, i:i + 1], dim ** -0.5)
        assert torch.equal(alone[:, 0], together[:, i])


def test_declines_what_it_does_not_handle():
    q, k, v, mask = inputs(1)
    assert attend(q, k, v, mask.float(), 0.125) is None  # additive masks: the caller's implementation
    assert attend(q, k, v, None, 0.125) is None
    assert attend(q.double(), k.double(), v.double(), mask, 0.125) is None
    assert attend(torch.randn(B, HQ, 17, D), k, v, torch.ones(B, 1, 17, L, dtype=torch.bool), 0.125) is None  # prefill
