"""Tests for the Triton block-sparse flash-attention kernel and its `torch.ops.optpass.block_sparse_attention` op.

The kernel runs on CPU under the Triton interpreter.  TRITON_INTERPRET=1 must be set before triton
is imported, so all interpreter checks run once in a subprocess (module-scoped fixture) that prints
a JSON dict of results; the tests below read it.  Each case compares the kernel with the pure-torch
reference and with `F.scaled_dot_product_attention` under the equivalent dense boolean mask (on rows
that attend at least one key).  Fake-impl / export / compile / fallback tests run in-process and need
no triton.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F

from optpass.backends.triton import sparse_ops

_HELPERS = r"""
import torch
import torch.nn.functional as F
from optpass.backends.triton import sparse_ops


def random_layout(b, h, s, sk, block, gen, zero_frac=0.15):
    # per-(b, h, query block) random key-block sets in random order; entries past the count are garbage
    # (including valid-but-unlisted block ids and out-of-range values) that must be ignored
    nq, nk = -(-s // block), -(-sk // block)
    idx = torch.randint(-1, nk + 2, (b, h, nq, nk + 1), generator=gen)
    num = torch.randint(1, nk + 1, (b, h, nq), generator=gen)
    num[torch.rand(b, h, nq, generator=gen) < zero_frac] = 0
    for i in range(b):
        for j in range(h):
            for qb in range(nq):
                n = int(num[i, j, qb])
                idx[i, j, qb, :n] = torch.randperm(nk, generator=gen)[:n]
    return num.int(), idx.int()


def dense_layout(b, h, s, sk, block):
    nq, nk = -(-s // block), -(-sk // block)
    idx = torch.arange(nk).flip(0).expand(b, h, nq, nk).int().contiguous()
    return torch.full((b, h, nq), nk, dtype=torch.int32), idx
"""

_WORKER = _HELPERS + r"""
import json
assert sparse_ops.HAVE_TRITON and sparse_ops.INTERPRET, (sparse_ops.HAVE_TRITON, sparse_ops.INTERPRET)
gen = torch.Generator().manual_seed(0)
res = {}

def case(name, b=2, h=4, hk=2, s=70, sk=70, d=32, block=16, causal=False, dtype=torch.float32,
         key_valid=None, layout=None, noncontig=False):
    if noncontig:  # [B, S, H, D] storage, as projections usually produce
        q = torch.randn(b, s, h, d, generator=gen).to(dtype).transpose(1, 2)
        k = torch.randn(b, sk, hk, d, generator=gen).to(dtype).transpose(1, 2)
        v = torch.randn(b, sk, hk, d, generator=gen).to(dtype).transpose(1, 2)
    else:
        q, k, v = (torch.randn(b, n, l, d, generator=gen).to(dtype) for n, l in ((h, s), (hk, sk), (hk, sk)))
    num, idx = layout if layout is not None else random_layout(b, h, s, sk, block, gen)
    scale = d ** -0.5
    out = sparse_ops.block_sparse_attention(q, k, v, num, idx, block, scale, causal, key_valid)
    ref = sparse_ops.reference_block_sparse_attention(q, k, v, num, idx, block, scale, causal, key_valid)
    mask = sparse_ops.layout_to_dense_mask(num, idx, block, s, sk, causal, key_valid).expand(b, h, s, sk)
    sdpa = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale,
                                          enable_gqa=True)
    rows = mask.any(-1)
    res[name] = {
        "err": (out.float() - ref.float()).abs().max().item(),
        "err_sdpa": (out.float() - sdpa)[rows].abs().max().item(),
        "ref": ref.float().abs().max().item(),
        "rows": int(rows.sum()), "empty_rows": int((~rows).sum()),
        "empty_max": out.float()[~rows].abs().max().item() if (~rows).any() else 0.0,
        "finite": bool(torch.isfinite(out.float()).all()),
        "shape": list(out.shape), "ref_shape": list(q.shape), "dtype": str(out.dtype),
        "kernel": sparse_ops.uses_triton(q, block),
    }
    return q, k, v

case("noncausal-gqa-ragged", s=70, sk=70, d=32, block=16)
case("causal-gqa-ragged-sk", s=70, sk=90, d=24, block=16, causal=True)
case("noncausal-sk-gt-s", s=45, sk=100, d=16, block=32, h=2, hk=1)
valid = torch.ones(2, 80, dtype=torch.bool)
valid[0, 61:] = False  # right padding
valid[1, :13] = False  # left padding
case("key-valid-causal", s=80, sk=80, d=32, block=32, causal=True, key_valid=valid)
case("key-valid-noncausal-mha", h=3, hk=3, s=50, sk=80, d=16, block=16, key_valid=valid)
num, idx = random_layout(2, 4, 64, 64, 16, gen, zero_frac=0.0)
num[0, 1, :2] = 0
num[1, 3, -1] = 0
case("zero-rows", s=64, sk=64, d=16, block=16, layout=(num, idx))
case("s200-block32", b=1, h=2, hk=1, s=200, sk=200, d=16, block=32, causal=True)
case("noncontig", s=40, sk=56, d=32, block=16, causal=True, noncontig=True)
case("fp16", s=70, sk=90, d=32, block=16, causal=True, dtype=torch.float16)
case("bf16-fallback", s=40, sk=40, d=16, block=16, dtype=torch.bfloat16)
q, k, v = case("dense-causal", h=2, hk=2, s=100, sk=100, d=32, block=32, causal=True,
               layout=dense_layout(2, 2, 100, 100, 32))
out = sparse_ops.block_sparse_attention(q, k, v, *dense_layout(2, 2, 100, 100, 32), 32, 32 ** -0.5, True, None)
res["dense-causal"]["err_is_causal"] = (out - F.scaled_dot_product_attention(q, k, v, is_causal=True)).abs().max().item()
print("RESULTS=" + json.dumps(res))
"""

CASES = (
    "noncausal-gqa-ragged",
    "causal-gqa-ragged-sk",
    "noncausal-sk-gt-s",
    "key-valid-causal",
    "key-valid-noncausal-mha",
    "zero-rows",
    "s200-block32",
    "noncontig",
)

# the same helpers in-process (the worker string is the single source)
_ns: dict[str, Any] = {}
exec(_HELPERS, _ns)
random_layout = _ns["random_layout"]
dense_layout = _ns["dense_layout"]


@pytest.fixture(scope="module")
def interp() -> dict[str, dict[str, Any]]:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _WORKER], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS=")][-1]
    return json.loads(line[len("RESULTS="):])


def _check(r: dict[str, Any], tol: float = 1e-5, kernel: bool = True) -> None:
    assert r["shape"] == r["ref_shape"]
    assert r["kernel"] is kernel
    assert r["finite"], r
    assert r["rows"] > 0, r
    assert r["err"] <= tol * max(1.0, r["ref"]), r
    assert r["err_sdpa"] <= tol * max(1.0, r["ref"]), r
    assert r["empty_max"] == 0.0, r  # rows that attend no key are exactly zero


@pytest.mark.parametrize("name", CASES)
def test_kernel_matches_reference_and_sdpa_interpreter(interp: dict, name: str) -> None:
    r = interp[name]
    assert r["dtype"] == "torch.float32"
    _check(r)


def test_zero_block_rows_interpreter(interp: dict) -> None:
    r = interp["zero-rows"]
    assert r["empty_rows"] >= 2 * 16 + 16, r  # the rows of the three query blocks with no listed block
    _check(r)


def test_fp16_interpreter(interp: dict) -> None:
    r = interp["fp16"]
    assert r["dtype"] == "torch.float16"
    _check(r, tol=5e-3)


def test_bf16_falls_back_under_interpreter(interp: dict) -> None:
    r = interp["bf16-fallback"]
    assert r["dtype"] == "torch.bfloat16"
    _check(r, tol=1e-2, kernel=False)


def test_dense_causal_equals_sdpa_is_causal_interpreter(interp: dict) -> None:
    r = interp["dense-causal"]
    _check(r)
    assert r["empty_rows"] == 0
    assert r["err_is_causal"] <= 1e-5 * max(1.0, r["ref"]), r


# ---- in-process: reference fallback, fake impl, export, compile (no interpreter needed) ----


def _inputs(
    b: int = 2, h: int = 4, hk: int = 2, s: int = 40, sk: int = 56, d: int = 16, block: int = 16,
    dtype: torch.dtype = torch.float32, seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=gen).to(dtype)
    k = torch.randn(b, hk, sk, d, generator=gen).to(dtype)
    v = torch.randn(b, hk, sk, d, generator=gen).to(dtype)
    num, idx = random_layout(b, h, s, sk, block, gen)
    return q, k, v, num, idx


def test_reference_fallback_cpu() -> None:
    q, k, v, num, idx = _inputs()
    assert not sparse_ops.uses_triton(q, 16) or sparse_ops.INTERPRET
    valid = torch.ones(2, 56, dtype=torch.bool)
    valid[1, :7] = False
    out = sparse_ops.block_sparse_attention(q, k, v, num, idx, 16, 0.25, True, valid)
    ref = sparse_ops.reference_block_sparse_attention(q, k, v, num, idx, 16, 0.25, True, valid)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # the reference itself against SDPA with the dense mask, on rows that attend a key; the others are zero
    mask = sparse_ops.layout_to_dense_mask(num, idx, 16, 40, 56, True, valid)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True)
    rows = mask.any(-1)
    assert rows.any() and (~rows).any()
    torch.testing.assert_close(ref[rows], sdpa[rows], rtol=1e-5, atol=1e-5)
    assert (ref[~rows] == 0).all()


def test_reference_dense_causal_equals_sdpa() -> None:
    q, k, v, _, _ = _inputs(h=2, hk=2, s=70, sk=70)
    out = sparse_ops.block_sparse_attention(q, k, v, *dense_layout(2, 2, 70, 70, 16), 16, 16 ** -0.5, True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-5, atol=1e-5)


def test_layout_mask_semantics() -> None:
    # one query block of 2 rows (block 2, S = 2, Sk = 5: key blocks {0,1}, {2,3}, {4}); lists blocks 2 and 0
    num = torch.tensor([[[2]]], dtype=torch.int32)
    idx = torch.tensor([[[[2, 0, 1]]]], dtype=torch.int32)  # the trailing 1 is past the count: ignored
    mask = sparse_ops.layout_to_dense_mask(num, idx, 2, 2, 5, False)
    assert mask[0, 0].tolist() == [[True, True, False, False, True]] * 2
    causal = sparse_ops.layout_to_dense_mask(num, idx, 2, 2, 5, True)  # queries are positions 3 and 4
    assert causal[0, 0].tolist() == [[True, True, False, False, False], [True, True, False, False, True]]


class _SparseAttn(torch.nn.Module):
    def __init__(self, num: torch.Tensor, idx: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("num", num)
        self.register_buffer("idx", idx)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.ops.optpass.block_sparse_attention(q, k, v, self.num, self.idx, 16, 0.25, True, None) * 2


def test_export_single_op() -> None:
    q, k, v, num, idx = _inputs()
    mod = _SparseAttn(num, idx).eval()
    ep = torch.export.export(mod, (q, k, v))
    target = torch.ops.optpass.block_sparse_attention.default
    hits = [n for n in ep.graph.nodes if n.op == "call_function" and n.target is target]
    assert len(hits) == 1, ep.graph
    assert hits[0].meta["val"].shape == q.shape and hits[0].meta["val"].dtype == q.dtype
    torch.testing.assert_close(ep.module()(q, k, v), mod(q, k, v))


def test_compile_fullgraph() -> None:
    torch._dynamo.reset()
    q, k, v, num, idx = _inputs()
    mod = _SparseAttn(num, idx).eval()
    compiled = torch.compile(mod, backend="eager", fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(q, k, v), mod(q, k, v))


def test_fake_impl_shapes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v, num, idx = _inputs(dtype=torch.float16)
    with FakeTensorMode() as mode:
        fq, fk, fv, fn, fi = (mode.from_tensor(t) for t in (q, k, v, num, idx))
        out = sparse_ops.block_sparse_attention(fq, fk, fv, fn, fi, 16, 0.25, False, None)
        valid = mode.from_tensor(torch.ones(2, 56, dtype=torch.bool))
        out2 = sparse_ops.block_sparse_attention(fq, fk, fv, fn, fi, 16, 0.25, True, valid)
        with pytest.raises(RuntimeError, match="multiple of Hk"):
            sparse_ops.block_sparse_attention(fq, fk[:, :1].expand(2, 3, 56, 16), fv[:, :1].expand(2, 3, 56, 16),
                                              fn, fi, 16, 0.25, False, None)
    assert out.shape == (2, 4, 40, 16) and out.dtype == torch.float16
    assert out2.shape == (2, 4, 40, 16) and out2.dtype == torch.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_kernel(dtype: torch.dtype, causal: bool) -> None:
    pytest.importorskip("triton")
    assert sparse_ops.HAVE_TRITON
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for block, d in ((16, 64), (64, 128), (128, 80)):
        q, k, v, num, idx = (t.cuda() for t in _inputs(b=2, h=8, hk=2, s=300, sk=333, d=d, block=block, dtype=dtype))
        assert sparse_ops.uses_triton(q, block)
        valid: Optional[torch.Tensor] = torch.rand(2, 333, device="cuda") > 0.1
        out = sparse_ops.block_sparse_attention(q, k, v, num, idx, block, d ** -0.5, causal, valid)
        ref = sparse_ops.reference_block_sparse_attention(q, k, v, num, idx, block, d ** -0.5, causal, valid)
        torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
