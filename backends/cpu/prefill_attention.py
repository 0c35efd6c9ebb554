"""`optpass::prefill_attention`: causal (or bidirectional) attention of a whole prefill from an empty cache, on
CPUs with AVX-512 BF16 (`csrc/prefill_attention.cpp`), optionally restricted to a block layout.

Both products run on bf16 dot-product instructions with fp32 sums and an fp32 online softmax: the numerics of
bf16 SDPA, at ~2x the speed of PyTorch's fp32 CPU flash kernel on the 2-core Zen 4 VM (`benchmarks/
prefill_attention.py`). With a layout (`count` / `index`: each query block's key blocks, `backends/sparse/layout.
as_indices`) it visits only the listed blocks, which makes it the CPU lowering of the sparse_attention pass.
Callers that use it change the model's numerics (q, k, v and the softmax weights rounded to bf16), so they
measure the quality effect as part of their rewrite.

`install` marks a model's full-attention layers so that their long prefills from an empty cache run the kernel
(`route`, called by optpass's attention function); the quantize pass installs it with int8 / int4 blocks, whose
prefill GEMMs already run on bf16 activations, so the quality it measures includes it.

`attend` returns None where the kernel does not apply (not built, not on this CPU, not float32, a head dim that
is not a multiple of 16); the caller then uses its own implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from optpass.backends.cpu.decode_attention import MAX_QUERY_ROWS

DENSE_BLOCK = 64  # query rows per task when no layout is given
MIN_ROWS = MAX_QUERY_ROWS + 1  # shorter calls (decode and verify steps) keep the decode kernel / SDPA


def available() -> bool:
    """Built, on a CPU with AVX-512 BF16 (the kernel's only implementation)."""
    from optpass.backends.cpu import gemv_ops

    return gemv_ops.available() and hasattr(torch.ops.optpass, "prefill_attention")


def register_fake() -> None:
    @torch.library.register_fake("optpass::prefill_attention")
    def _(q: Tensor, k: Tensor, v: Tensor, count: Tensor | None, index: Tensor | None, starts: Tensor | None,
          block: int, scale: float, causal: bool) -> Tensor:
        return q.new_empty((q.shape[0], q.shape[2], q.shape[1], q.shape[3]))


def applies(query: Tensor, key: Tensor, value: Tensor, block: int = DENSE_BLOCK) -> bool:
    return query.device.type == "cpu" and all(t.dtype == torch.float32 and t.stride(-1) == 1
                                              for t in (query, key, value)) \
        and query.shape[-1] % 16 == 0 and block % 16 == 0 and query.shape[1] % key.shape[1] == 0 and available()


def attend(query: Tensor, key: Tensor, value: Tensor, scale: float, causal: bool = True,
           layout: tuple[Tensor, Tensor] | None = None, block: int = DENSE_BLOCK,
           starts: Tensor | None = None) -> Tensor | None:
    """[B, S, Hq, D] attention of queries [B, Hq, S, D] over the first S keys of [B, Hk, S', D]; `layout`: (count
    [B or 1, Hq or 1, nQ], index [.., nQ, nK]) of the key blocks each query block visits; `starts` [B]: each row's
    first real position (left padding; earlier queries give zeros). None where the kernel does not apply."""
    if not applies(query, key, value, block):
        return None
    count, index = layout if layout is not None else (None, None)
    return torch.ops.optpass.prefill_attention(query, key, value, count, index, starts, block, float(scale), causal)


ATTRIBUTE = "optpass_prefill_kernel"  # set on attention modules whose long prefills run this kernel


def install(model: nn.Module) -> Callable[[], None]:
    """Route the long prefills of `model`'s full-attention layers through the kernel (through optpass's attention
    function, `backends/kv/attention.py`); returns the undo. A no-op where the kernel is not built here or the
    model's attention cannot be routed."""
    from optpass.backends.kv import enable_compressed_attention
    from optpass.backends.kv.attention import support_reason
    from optpass.hf_compat import attention_modules, full_attention_layers

    if not available() or support_reason(model) is not None:  # not a transformers LM optpass can route
        return lambda: None
    enable_compressed_attention(model)
    full = set(full_attention_layers(model.config))
    modules = [m for i, m in attention_modules(model).items() if i in full]
    for module in modules:
        setattr(module, ATTRIBUTE, True)
    return lambda: remove(model)


def remove(model: nn.Module) -> None:
    """Every layer back to the model's own attention for its prefills."""
    for module in model.modules():
        if hasattr(module, ATTRIBUTE):
            delattr(module, ATTRIBUTE)


def mark_attention(module: nn.Module) -> None:
    """`install` for one attention module run outside its model (streaming quantization runs one decoder block
    at a time): its own config copy attends through optpass's attention function, and the module is marked."""
    from optpass.backends.kv.attention import PREFIX, register

    current = module.config._attn_implementation
    if not current.startswith(PREFIX):
        module.config._attn_implementation = register(current)
    setattr(module, ATTRIBUTE, True)


def installed(model: nn.Module) -> bool:
    return any(getattr(m, ATTRIBUTE, False) for m in model.modules())


def route(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Any, scale: float,
          kwargs: dict[str, Any]) -> Tensor | None:
    """[B, S, H, D] when this attention call is a long prefill from an empty cache of a layer `install` marked
    (causal, at most left padding, no softcap / sinks / window), else None: the model's own attention runs."""
    q_len = query.shape[2]
    if not getattr(module, ATTRIBUTE, False) or q_len < MIN_ROWS:
        return None
    from optpass.backends.sparse.attend import prefill_starts  # (it imports this module)

    usable, starts = prefill_starts(module, mask, q_len, key.shape[2], kwargs)
    if not usable:
        return None
    return attend(query, key, value, scale, causal=True, starts=starts)
