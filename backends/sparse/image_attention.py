"""Block-sparse self-attention over a diffusion transformer's image tokens (the `local_2d` layout), installed
through diffusers' attention-processor API without copying any processor.

Each planned attention module keeps its own processor; a thin wrapper runs it inside a `TorchFunctionMode` that
routes its `scaled_dot_product_attention` call to the block-sparse lowering when the call is unmasked, non-causal
self-attention over exactly the image grid (queries and keys both `height x width` tokens) of at least
`min_tokens` tokens, outside autograd. Anything else (cross-attention to text, joint text + image attention, a
mask, dropout, a grid below the crossover, training) goes to SDPA unchanged. The grid comes from the model's latent input ([B, C, H, W], divided
by the patch size), read by a forward pre-hook, so one plan serves every resolution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from optpass.backends.sparse.execute import block_sparse_attention
from optpass.backends.sparse.patterns.local_2d import Local2D

ATTRIBUTE = "optpass_image_sparse"  # set on the model: its ImageSparsity


@dataclass(frozen=True)
class ImageSparsity:
    """The decision for a model's image self-attention: a 2D window of `radius` tokens over `block`-token blocks,
    used from `min_tokens` image tokens on (below, dense SDPA is faster on the target)."""

    radius: int
    block: int = 64
    min_tokens: int = 2

    def to_dict(self) -> dict[str, Any]:
        return {"radius": self.radius, "block": self.block, "min_tokens": self.min_tokens}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageSparsity:
        return cls(int(data["radius"]), int(data.get("block", 64)), int(data.get("min_tokens", 2)))

    def keep(self, height: int, width: int) -> Tensor:
        """keep [1, 1, nQ, nK] over the row-major grid."""
        return _layout(height, width, self.radius, self.block)


@lru_cache(maxsize=16)
def _layout(height: int, width: int, radius: int, block: int) -> Tensor:
    probe = torch.empty(1, 1, height * width, 1)
    return Local2D(height, width, radius).block_mask(probe, probe, block)


def latent_grid(model: nn.Module, latent: Any) -> tuple[int, int] | None:
    """(rows, columns) of image tokens for a [B, C, H, W] latent and the model's patch size; None otherwise
    (an already-packed [B, S, C] sequence, as Flux takes, does not say its grid)."""
    patch = getattr(getattr(model, "config", None), "patch_size", None)
    if not isinstance(latent, Tensor) or latent.dim() != 4 or not isinstance(patch, int) or patch < 1:
        return None
    return latent.shape[-2] // patch, latent.shape[-1] // patch


@dataclass
class RouteState:
    """Shared by a model's wrapped processors: the current call's grid, and what the routing did (for the report
    and the tests)."""

    plan: ImageSparsity
    grid: tuple[int, int] | None = None
    sparse_calls: int = 0
    dense_calls: int = 0
    handles: list[Any] = field(default_factory=list)


class _RouteSdpa(TorchFunctionMode):
    def __init__(self, state: RouteState) -> None:
        super().__init__()
        self.state = state

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            out = self._sparse(*args, **kwargs)
            if out is not None:
                self.state.sparse_calls += 1
                return out
            self.state.dense_calls += 1
        return func(*args, **kwargs)

    def _sparse(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                enable_gqa: bool = False) -> Tensor | None:
        grid, plan = self.state.grid, self.state.plan
        if grid is None or attn_mask is not None or is_causal or dropout_p or query.dim() != 4:
            return None
        if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
            return None  # training: the dense math (FlexAttention has no CPU backward)
        tokens = grid[0] * grid[1]
        if query.shape[-2] != tokens or key.shape[-2] != tokens or tokens < plan.min_tokens:
            return None
        scale = scale if scale is not None else query.shape[-1] ** -0.5
        return block_sparse_attention(query, key, value, plan.keep(*grid), plan.block, scale, causal=False)


class SparseImageProcessor:
    """Runs the module's own processor with its SDPA call routed (see the module docstring)."""

    def __init__(self, inner: Any, state: RouteState) -> None:
        self.inner, self.state = inner, state

    def __call__(self, attn: nn.Module, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        with _RouteSdpa(self.state):
            return self.inner(attn, hidden_states, *args, **kwargs)


def self_attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """name -> diffusers attention module that attends over its own input (not cross-attention to text)."""
    return {name: m for name, m in model.named_modules()
            if callable(getattr(m, "set_processor", None)) and hasattr(m, "processor")
            and not getattr(m, "is_cross_attention", False)}


def install_image_sparse(model: nn.Module, plan: ImageSparsity) -> tuple[Callable[[], None], RouteState]:
    """Wrap every self-attention processor and add the grid-reading pre-hook; returns (undo, state)."""
    state = RouteState(plan)
    modules = self_attention_modules(model)
    originals = {name: m.processor for name, m in modules.items()}
    for m in modules.values():
        inner = m.processor.inner if isinstance(m.processor, SparseImageProcessor) else m.processor
        m.set_processor(SparseImageProcessor(inner, state))

    def read_grid(module: nn.Module, args: tuple, kwargs: dict) -> None:
        state.grid = latent_grid(module, kwargs.get("hidden_states", args[0] if args else None))

    state.handles.append(model.register_forward_pre_hook(read_grid, with_kwargs=True))
    previous = getattr(model, ATTRIBUTE, None)
    setattr(model, ATTRIBUTE, plan)

    def undo() -> None:  # idempotent: the pass may drop a plan that does not pay, the manager undo it later
        if not state.handles:
            return
        for name, processor in originals.items():
            modules[name].set_processor(processor)
        for handle in state.handles:
            handle.remove()
        state.handles.clear()
        if previous is None:
            delattr(model, ATTRIBUTE)
        else:
            setattr(model, ATTRIBUTE, previous)
    return undo, state
