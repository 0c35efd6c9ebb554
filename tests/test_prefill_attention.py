"""optpass::prefill_attention (AVX-512 BF16 CPUs): equals attention over bf16-rounded q * scale, k and v within the
rounding of the softmax weights (causal and not, grouped heads, ragged lengths, head dims 64-256, left padding,
block layouts), and the quantize pass routes a model's long prefills through it where it measures quality."""

from __future__ import annotations

import math

import pytest
import torch

from optpass.backends.cpu import prefill_attention
from optpass.backends.sparse.layout import as_indices, clip_causal, dense_mask

pytestmark = pytest.mark.skipif(not prefill_attention.available(),
                                reason="optpass::prefill_attention needs a CPU with AVX-512 BF16 and a C++ compiler")


def reference(q, k, v, scale, mask):
    """float64 attention of bf16-rounded inputs (q pre-scaled, as the kernel rounds it), [B, S, H, D]; rows that
    see no key give zeros."""
    groups = q.shape[1] // k.shape[1]
    qb = (q * scale).bfloat16().double()
    kb, vb = (t.bfloat16().double().repeat_interleave(groups, 1) for t in (k, v))
    scores = (qb @ kb.transpose(-1, -2)).masked_fill(~mask, -math.inf)
    return (scores.softmax(-1).nan_to_num(0.0) @ vb).transpose(1, 2).float()


def token_mask(batch, seq, causal, starts=None):
    mask = torch.ones(seq, seq, dtype=torch.bool)
    mask = (mask.tril() if causal else mask)[None, None].repeat(batch, 1, 1, 1)
    for b, start in enumerate(starts.tolist() if starts is not None else []):
        mask[b, :, :, :start] = False
        mask[b, :, :start] = False
    return mask


@pytest.mark.parametrize("heads,kv_heads,seq,dim,causal", [
    (9, 3, 200, 64, True), (4, 2, 130, 128, False), (2, 1, 77, 256, True), (4, 4, 64, 32, True), (2, 1, 300, 16, True)])
def test_matches_attention_over_bf16_inputs(heads, kv_heads, seq, dim, causal):
    g = torch.Generator().manual_seed(seq)
    q = torch.randn(2, seq, heads, dim, generator=g).transpose(1, 2)  # transformers' strided layout
    k, v = torch.randn(2, kv_heads, seq + 5, dim, generator=g), torch.randn(2, kv_heads, seq + 5, dim, generator=g)
    scale = dim ** -0.5
    starts = torch.tensor([0, seq // 3])
    for rows_start in (None, starts):
        out = prefill_attention.attend(q, k, v, scale, causal, starts=rows_start)
        mask = token_mask(2, seq, causal, rows_start)
        want = reference(q, k[:, :, :seq], v[:, :, :seq], scale, mask)
        # the softmax weights are rounded to bf16 before the value product: ~2^-9 relative each
        torch.testing.assert_close(out, want, atol=5e-3, rtol=1e-2)
        fp32 = torch.nn.functional.scaled_dot_product_attention(
            q, k[:, :, :seq].repeat_interleave(heads // kv_heads, 1), v[:, :, :seq].repeat_interleave(heads // kv_heads, 1),
            attn_mask=mask, scale=scale).transpose(1, 2)
        assert (out - want).abs().max() < (out - fp32).abs().max() + 1e-3  # closer to the bf16 reference
    padded = prefill_attention.attend(q, k, v, scale, causal, starts=starts)
    assert padded[1, :seq // 3].abs().max() == 0  # padding queries see no key: zeros


def test_a_layout_visits_only_the_listed_blocks():
    g = torch.Generator().manual_seed(0)
    seq, block = 256, 32
    q, k, v = (torch.randn(1, 2, seq, 64, generator=g) for _ in range(3))
    keep = clip_causal(torch.rand(1, 2, 8, 8, generator=g) < 0.4)
    out = prefill_attention.attend(q, k, v, 0.125, True, as_indices(keep), block)
    mask = dense_mask(keep, seq, seq, block)
    torch.testing.assert_close(out, reference(q, k, v, 0.125, mask), atol=5e-3, rtol=1e-2)
    dense = prefill_attention.attend(q, k, v, 0.125, True)
    assert (out - dense).abs().max() > 0.1  # dropped blocks change the result (the layout is not ignored)


def test_the_op_traces_as_one_opaque_op():
    q, k, v = (torch.randn(1, 2, 48, 32) for _ in range(3))
    torch.library.opcheck(torch.ops.optpass.prefill_attention.default, (q, k, v, None, None, None, 64, 0.2, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_declines_what_it_cannot_run():
    q = torch.randn(1, 2, 40, 72)  # head dim not a multiple of 16
    assert prefill_attention.attend(q, q, q, 0.1) is None
    assert prefill_attention.attend(q[..., :64].double(), q[..., :64].double(), q[..., :64].double(), 0.1) is None


@torch.no_grad()
def test_quantize_routes_long_prefills_and_the_checkpoint_keeps_it(tmp_path):
    import optpass
    from optpass.models import tiny_llama
    from optpass.passes.quantize import QuantizeConfig

    model = tiny_llama(layers=2).eval()
    ids = torch.randint(0, 256, (2, 90), generator=torch.Generator().manual_seed(1))
    opt = optpass.optimize(model, passes=[QuantizeConfig(weights="int8", lm_head="keep")], quality_budget="ppl:10%")
    record = opt.optpass_report.passes[0]
    assert record.status == "applied" and "bf16 flash kernel" in record.details["prefill_attention"]
    assert prefill_attention.installed(opt)
    calls: list[int] = []
    real = prefill_attention.attend

    def counted(*args, **kwargs):
        calls.append(args[0].shape[2])
        return real(*args, **kwargs)
    try:
        prefill_attention.attend = counted
        routed = opt(input_ids=ids).logits
        assert calls == [90, 90]
        opt(input_ids=ids[:, :16])  # a short prefill: the model's own attention
        assert calls == [90, 90]
    finally:
        prefill_attention.attend = real
    for module in opt.modules():  # the same model with its own attention everywhere
        if getattr(module, prefill_attention.ATTRIBUTE, False):
            setattr(module, prefill_attention.ATTRIBUTE, False)
    own = opt(input_ids=ids).logits
    torch.testing.assert_close(routed, own, atol=5e-2, rtol=5e-2)
    assert (routed - own).abs().max() > 0  # it really ran something else
    for module in opt.modules():
        if hasattr(module, prefill_attention.ATTRIBUTE):
            setattr(module, prefill_attention.ATTRIBUTE, True)
    optpass.save(opt, tmp_path / "ckpt")
    loaded = optpass.load(tmp_path / "ckpt")
    assert prefill_attention.installed(loaded)
    torch.testing.assert_close(loaded(input_ids=ids).logits, routed, atol=1e-5, rtol=1e-5)
