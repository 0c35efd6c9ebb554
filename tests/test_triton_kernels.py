"""Tests for the Triton weight-only int8 / int4 linear kernels and their `torch.ops.optpass` custom ops.

The kernels run on CPU under the Triton interpreter.  TRITON_INTERPRET=1 must be set before triton
is imported, so all interpreter checks run once in a subprocess (module-scoped fixture) that prints
a JSON dict of results; the tests below read it.  Export / compile / fallback tests run in-process
(fake impl + reference path) and need no triton.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import torch

from optpass.backends import quant_format as qf
from optpass.backends.triton import ops

M_VALUES = (1, 5, 33)
GROUP_SIZES = (32, 64, 128)

_WORKER = r"""
import json, torch
from optpass.backends import quant_format as qf
from optpass.backends.triton import ops

assert ops.HAVE_TRITON and ops.INTERPRET, (ops.HAVE_TRITON, ops.INTERPRET)
torch.manual_seed(0)
res = {}

def rec(name, y, ref, x, gs=None):
    res[name] = {"err": (y.float() - ref.float()).abs().max().item(), "ref": ref.float().abs().max().item(),
                 "shape": list(y.shape), "ref_shape": list(ref.shape), "dtype": str(y.dtype),
                 "kernel": ops.uses_triton(x, gs)}

def int8_case(name, x, n, bias, fn=ops.int8_weight_only_linear):
    q, s = qf.quantize_int8(torch.randn(n, x.shape[-1]))
    b = torch.randn(n).to(x.dtype) if bias else None
    ref = x.float() @ qf.dequantize_int8(q, s).T + (b.float() if bias else 0)
    rec(name, fn(x, q, s, b), ref, x)

def int4_case(name, x, n, gs, bias, fn=ops.int4_weight_only_linear):
    q, s, z = qf.quantize_int4(torch.randn(n, x.shape[-1]), gs)
    b = torch.randn(n).to(x.dtype) if bias else None
    ref = x.float() @ qf.dequantize_int4(q, s, z, gs).T + (b.float() if bias else 0)
    rec(name, fn(x, qf.pack_int4(q), s, z, gs, b), ref, x, gs)

for m in (1, 5, 33):
    for bias in (False, True):
        int8_case(f"int8-m{m}-b{int(bias)}", torch.randn(m, 200), 72, bias)
        for gs in (32, 64, 128):
            int4_case(f"int4-g{gs}-m{m}-b{int(bias)}", torch.randn(m, 384), 72, gs, bias)
int8_case("int8-3d", torch.randn(2, 3, 200), 40, True)
int4_case("int4-3d", torch.randn(2, 3, 256), 40, 64, True)
int8_case("int8-fp16", torch.randn(5, 200).half(), 72, True)
int4_case("int4-fp16", torch.randn(5, 256).half(), 72, 32, True)
int8_case("int8-noncontig", torch.randn(200, 9).T, 40, False)
int4_case("int4-noncontig", torch.randn(256, 9).T, 40, 128, False)
int8_case("int8-bf16-fallback", torch.randn(5, 200).bfloat16(), 40, True)
int8_compiled = torch.compile(ops.int8_weight_only_linear, backend="eager", fullgraph=True)
int4_compiled = torch.compile(ops.int4_weight_only_linear, backend="eager", fullgraph=True)
int8_case("int8-compiled", torch.randn(2, 5, 200), 72, True, int8_compiled)
int4_case("int4-compiled", torch.randn(2, 5, 256), 72, 64, True, int4_compiled)
print("RESULTS=" + json.dumps(res))
"""


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
    assert r["err"] <= tol * max(1.0, r["ref"]), r


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m", M_VALUES)
def test_int8_kernel_interpreter(interp: dict, m: int, bias: bool) -> None:
    r = interp[f"int8-m{m}-b{int(bias)}"]
    assert r["dtype"] == "torch.float32"
    _check(r)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("gs", GROUP_SIZES)
def test_int4_kernel_interpreter(interp: dict, gs: int, m: int, bias: bool) -> None:
    _check(interp[f"int4-g{gs}-m{m}-b{int(bias)}"])


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_3d_input_and_compile_interpreter(interp: dict, kind: str) -> None:
    r = interp[f"{kind}-3d"]
    assert r["shape"] == [2, 3, 40]
    _check(r)
    r = interp[f"{kind}-compiled"]
    assert r["shape"] == [2, 5, 72]
    _check(r)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_fp16_and_noncontiguous_interpreter(interp: dict, kind: str) -> None:
    r = interp[f"{kind}-fp16"]
    assert r["dtype"] == "torch.float16"
    _check(r, tol=5e-3)
    _check(interp[f"{kind}-noncontig"])


def test_bf16_falls_back_under_interpreter(interp: dict) -> None:
    r = interp["int8-bf16-fallback"]
    assert r["dtype"] == "torch.bfloat16"
    _check(r, tol=1e-2, kernel=False)


# ---- in-process: reference fallback, fake impl, export, compile (no interpreter needed) ----


def _int8_weights(n: int = 24, k: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, s = qf.quantize_int8(torch.randn(n, k))
    return q, s, torch.randn(n)


def _int4_weights(n: int = 24, k: int = 128, gs: int = 32) -> tuple[torch.Tensor, ...]:
    q, s, z = qf.quantize_int4(torch.randn(n, k), gs)
    return qf.pack_int4(q), s, z, torch.randn(n), qf.dequantize_int4(q, s, z, gs)


class _Int8Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        q, s, b = _int8_weights()
        self.register_buffer("q", q)
        self.register_buffer("scale", s)
        self.register_buffer("bias", b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.optpass.int8_weight_only_linear(x, self.q, self.scale, self.bias).relu()


class _Int4Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        p, s, z, b, _ = _int4_weights()
        self.register_buffer("packed", p)
        self.register_buffer("scale", s)
        self.register_buffer("zero", z)
        self.register_buffer("bias", b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.optpass.int4_weight_only_linear(x, self.packed, self.scale, self.zero, 32, self.bias) * 2


def test_reference_fallback_cpu() -> None:
    x = torch.randn(2, 3, 64)
    assert not ops.uses_triton(x) or ops.INTERPRET
    q, s, b = _int8_weights()
    y = ops.int8_weight_only_linear(x, q, s, b)
    torch.testing.assert_close(y, x @ qf.dequantize_int8(q, s).T + b, rtol=1e-5, atol=1e-4)
    p, s4, z, b4, w4 = _int4_weights()
    x4 = torch.randn(5, 128, dtype=torch.bfloat16)
    y4 = ops.int4_weight_only_linear(x4, p, s4, z, 32, None)
    assert y4.dtype == torch.bfloat16 and y4.shape == (5, 24)
    torch.testing.assert_close(y4.float(), x4.float() @ w4.T, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("module_cls, op, k", [(_Int8Linear, "int8", 64), (_Int4Linear, "int4", 128)])
def test_export_single_op(module_cls: type, op: str, k: int) -> None:
    target = getattr(torch.ops.optpass, f"{op}_weight_only_linear").default
    mod = module_cls().eval()
    x = torch.randn(3, 4, k)
    ep = torch.export.export(mod, (x,))
    hits = [n for n in ep.graph.nodes if n.op == "call_function" and n.target is target]
    assert len(hits) == 1, ep.graph
    assert f"torch.ops.optpass.{op}_weight_only_linear.default" in ep.graph_module.code
    assert hits[0].meta["val"].shape == (3, 4, 24)
    torch.testing.assert_close(ep.module()(x), mod(x))


@pytest.mark.parametrize("module_cls, k", [(_Int8Linear, 64), (_Int4Linear, 128)])
def test_compile_fullgraph(module_cls: type, k: int) -> None:
    torch._dynamo.reset()
    mod = module_cls().eval()
    compiled = torch.compile(mod, backend="eager", fullgraph=True, dynamic=False)
    x = torch.randn(7, k)
    torch.testing.assert_close(compiled(x), mod(x))


def test_fake_impl_shapes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, s, b = _int8_weights()
    p, s4, z, b4, _ = _int4_weights()
    with FakeTensorMode() as mode:
        x8 = mode.from_tensor(torch.randn(2, 9, 64))
        x4 = mode.from_tensor(torch.randn(9, 128, dtype=torch.float16))
        y8 = ops.int8_weight_only_linear(x8, mode.from_tensor(q), mode.from_tensor(s), None)
        y4 = ops.int4_weight_only_linear(
            x4, mode.from_tensor(p), mode.from_tensor(s4), mode.from_tensor(z), 32, mode.from_tensor(b4)
        )
    assert y8.shape == (2, 9, 24) and y8.dtype == torch.float32
    assert y4.shape == (9, 24) and y4.dtype == torch.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_kernels(dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    assert ops.HAVE_TRITON
    dev = "cuda"
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for m in (1, 5, 33, 130):
        x = torch.randn(2, m, 512, device=dev).to(dtype)
        assert ops.uses_triton(x)
        q, s = qf.quantize_int8(torch.randn(200, 512))
        b = torch.randn(200, device=dev).to(dtype)
        y = ops.int8_weight_only_linear(x, q.to(dev), s.to(dev), b)
        ref = x.float() @ qf.dequantize_int8(q, s).to(dev).T + b.float()
        torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
        for gs in GROUP_SIZES:
            q4, s4, z4 = qf.quantize_int4(torch.randn(200, 512), gs)
            y = ops.int4_weight_only_linear(x, qf.pack_int4(q4).to(dev), s4.to(dev), z4.to(dev), gs, b)
            ref = x.float() @ qf.dequantize_int4(q4, s4, z4, gs).to(dev).T + b.float()
            torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
