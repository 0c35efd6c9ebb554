"""The block-stack wrapper: a `ModuleList` that runs, reuses or forecasts its middle blocks per denoising step.

`install_block_cache(model, "transformer_blocks", policy)` swaps the model's block list for a
`CachedBlockStack` holding the *same* block modules (so parameter names, `state_dict` keys, `.to()` and the
model's `forward` are unchanged) and adds one forward pre-hook on the model that reads the timestep. The
model's own loop `for block in self.transformer_blocks: h = block(h, ...)` then iterates over runners:

    blocks [0, n_first)          always run; their residual is the probe signal (First-Block-Cache)
    blocks [n_first, L - n_last) run, or replaced by  h + cached residual  (reuse)  /  h + Taylor forecast
    blocks [L - n_last, L)       always run

A generation starts when a call's timestep is not below the previous call's (samplers count down) or the
batch shape changes: all cached state is dropped then. Calls whose batch mixes timesteps, or that run with
gradients in training mode, compute every block and leave the cache alone (the quality guard's single
forwards, training steps).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from optpass.errors import UnsupportedModelError
from optpass.passes.dit_caching.forecast import TaylorForecaster
from optpass.passes.dit_caching.policy import COMPUTE, FORECAST, CachePolicy, StepSignal

TIMESTEP_NAMES = ("timestep", "timesteps", "t")


def rel_l1(new: torch.Tensor, ref: torch.Tensor) -> float:
    return float((new - ref).abs().mean() / ref.abs().mean().clamp_min(1e-12))


@dataclass
class CacheStats:
    """Block executions vs block-steps over every cached generation since the last `reset_stats()`."""

    steps: int = 0
    blocks_run: int = 0
    block_steps: int = 0
    decisions: list[str] = field(default_factory=list)

    @property
    def computed_fraction(self) -> float:
        return self.blocks_run / self.block_steps if self.block_steps else 1.0


class BlockCacheController:
    """Per-generation state (cached residual, forecaster, last timestep) plus the policy; `reset()` drops it."""

    def __init__(self, policy: CachePolicy | None, num_blocks: int, n_first: int, n_last: int,
                 timestep_arg: str | int = "timestep", trace: bool = False) -> None:
        if not (n_first >= 0 and n_last >= 0 and n_first + n_last < num_blocks):
            raise UnsupportedModelError(
                f"dit_cache: {num_blocks} blocks with first {n_first} and last {n_last} always computed leaves "
                "no block to cache")
        self.policy, self.num_blocks, self.n_first, self.n_last = policy, num_blocks, n_first, n_last
        self.timestep_arg = timestep_arg
        self.timestep_index: int | None = None  # positional index of a named timestep argument
        self.trace_enabled = trace
        self.trace: list[dict[str, float]] = []
        order = getattr(policy, "order", 0)
        self.forecaster = TaylorForecaster(order)
        self.probe_forecaster = TaylorForecaster(order)
        self.stats = CacheStats()
        self.reset()

    @property
    def middle(self) -> range:
        return range(self.n_first, self.num_blocks - self.n_last)

    def reset(self) -> None:
        """Start a new generation: forget residuals, forecasts and the policy's running state."""
        self.step, self.last_t, self.shape = -1, None, None
        self.active = False
        self.residual: torch.Tensor | None = None
        self.probe: torch.Tensor | None = None
        self.probe_ref: torch.Tensor | None = None
        self.prev_probe: torch.Tensor | None = None
        self.prev_modulated: torch.Tensor | None = None
        self.mode = COMPUTE
        self.forecaster.reset()
        self.probe_forecaster.reset()
        if self.policy is not None:
            self.policy.reset()

    def reset_stats(self) -> None:
        self.stats = CacheStats()
        self.trace = []

    # -- called by the model's forward pre-hook -------------------------------------------------------
    def begin_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        name, index = (self.timestep_arg, self.timestep_index) if isinstance(self.timestep_arg, str) else (
            None, self.timestep_arg)
        t = kwargs.get(name) if name in kwargs else (args[index] if index is not None and len(args) > index else None)
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        value = _common_timestep(t)
        if value is None or (torch.is_grad_enabled() and module.training):
            self.active = False  # mixed / missing timestep, or training: compute everything, touch nothing
            return
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else None
        if self.last_t is None or value >= self.last_t or shape != self.shape:
            self.reset()
        self.active, self.step, self.last_t, self.shape = True, self.step + 1, value, shape
        self.stats.steps += 1
        self.stats.block_steps += self.num_blocks

    # -- called by the runners ------------------------------------------------------------------------
    def run_block(self, i: int, block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        if not self.active:
            return block(hidden, *args, **kwargs)
        if i == 0:
            self.stack_input = hidden
        if i == self.n_first:
            self.middle_input = hidden
            self.mode = self._decide(args, kwargs)
            self.stats.decisions.append(self.mode)
        if i in self.middle and self.mode != COMPUTE:
            if i != self.n_first:
                return hidden  # the whole middle segment was applied at its first block
            delta = self.residual if self.mode != FORECAST else self.forecaster.predict(self.step)
            return hidden + delta
        out = block(hidden, *args, **kwargs)
        self.stats.blocks_run += 1
        if i == self.n_first - 1:
            self.probe = out - self.stack_input
        if i == self.middle[-1] and self.mode == COMPUTE:
            self.residual = (out - self.middle_input).detach()
            self.forecaster.update(self.step, self.residual)
            self.probe_ref = self.probe
        return out

    def _decide(self, args: tuple, kwargs: dict) -> str:
        wanted = self.policy.signals if self.policy is not None else frozenset()
        probe = self.probe if self.n_first else None
        signal: dict[str, Any] = {"step": self.step, "timestep": self.last_t}
        if probe is not None and self.probe_ref is not None:
            signal["probe_change"] = rel_l1(probe, self.probe_ref)
        if "forecast_error" in wanted and probe is not None and self.probe_forecaster.ready:
            signal["forecast_error"] = rel_l1(self.probe_forecaster.predict(self.step), probe)
        if "modulated_change" in wanted or self.trace_enabled:
            modulated = self._modulated(args, kwargs)
            if self.prev_modulated is not None:
                signal["modulated_change"] = rel_l1(modulated, self.prev_modulated)
            self.prev_modulated = modulated
        if self.trace_enabled:
            self.trace.append({**signal, "probe_step_change": rel_l1(probe, self.prev_probe)
                               if probe is not None and self.prev_probe is not None else None})
        if probe is not None:
            self.prev_probe = probe
        if self.policy is None:
            mode = COMPUTE
        else:
            mode = self.policy.decide(StepSignal(**signal), have_cache=self.residual is not None)
        if mode == COMPUTE and probe is not None:
            self.probe_forecaster.update(self.step, probe.detach())
        return mode

    def _modulated(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The first block's timestep-modulated input (AdaLN norm1), or the stack input for other blocks."""
        block0 = self.blocks[0]
        norm1 = getattr(block0, "norm1", None)
        if norm1 is not None and "timestep" in kwargs and "class_labels" in kwargs:
            try:
                out = norm1(self.stack_input, kwargs["timestep"], kwargs["class_labels"],
                            hidden_dtype=self.stack_input.dtype)
                return out[0] if isinstance(out, tuple) else out
            except TypeError:
                pass
        return self.stack_input


class _Runner:
    """What the model's block loop calls in place of block i (same call signature)."""

    __slots__ = ("controller", "index", "block")

    def __init__(self, controller: BlockCacheController, index: int, block: nn.Module) -> None:
        self.controller, self.index, self.block = controller, index, block

    def __call__(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.controller.run_block(self.index, self.block, hidden, args, kwargs)


class CachedBlockStack(nn.ModuleList):
    """A ModuleList whose iteration yields cache-aware runners; indexing still returns the blocks."""

    def __init__(self, blocks: nn.ModuleList, controller: BlockCacheController) -> None:
        super().__init__(list(blocks))
        self.controller = controller
        controller.blocks = self

    def __iter__(self):
        mods = list(self._modules.values())
        return iter([_Runner(self.controller, i, m) for i, m in enumerate(mods)])


def _common_timestep(t: Any) -> float | None:
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        flat = t.detach().flatten().float()
        if flat.numel() == 0 or (flat.numel() > 1 and not bool((flat == flat[0]).all())):
            return None
        return float(flat[0])
    return float(t)


def find_timestep_arg(model: nn.Module) -> str | int:
    """The forward parameter holding the timestep: by name for keyword use, else its positional index."""
    params = list(inspect.signature(model.forward).parameters)
    for name in TIMESTEP_NAMES:
        if name in params:
            return name
    raise UnsupportedModelError(f"dit_cache: {type(model).__name__}.forward has no timestep argument "
                                f"(looked for {', '.join(TIMESTEP_NAMES)}); parameters are {params}")


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr


def install_block_cache(model: nn.Module, stack_path: str, policy: CachePolicy | None,
                        n_first: int | None = None, n_last: int | None = None,
                        timestep_arg: str | int | None = None, trace: bool = False) -> BlockCacheController:
    """Wrap `model.<stack_path>` (a ModuleList of blocks returning one tensor) in place; returns the controller."""
    remove_block_cache(model)
    parent, attr = _parent(model, stack_path)
    blocks = getattr(parent, attr, None)
    if not isinstance(blocks, nn.ModuleList):
        raise UnsupportedModelError(f"dit_cache: {stack_path!r} is not an nn.ModuleList of blocks")
    default_first, default_last = policy.default_structure if policy is not None else (1, 0)
    timestep_arg = find_timestep_arg(model) if timestep_arg is None else timestep_arg
    controller = BlockCacheController(
        policy, len(blocks), default_first if n_first is None else n_first,
        default_last if n_last is None else n_last, timestep_arg, trace)
    if isinstance(timestep_arg, str):
        params = list(inspect.signature(model.forward).parameters)
        controller.timestep_index = params.index(timestep_arg) if timestep_arg in params else None
    setattr(parent, attr, CachedBlockStack(blocks, controller))
    model.register_forward_pre_hook(controller.begin_call, with_kwargs=True)
    model._optpass_dit_cache = (stack_path, controller)  # noqa: SLF001 - found again by remove / saved_state
    return controller


def cache_controller(model: nn.Module) -> BlockCacheController | None:
    found = getattr(model, "_optpass_dit_cache", None)
    return found[1] if found else None


def remove_block_cache(model: nn.Module) -> None:
    """Undo `install_block_cache`: the plain ModuleList back, the pre-hook gone."""
    found = getattr(model, "_optpass_dit_cache", None)
    if not found:
        return
    stack_path, controller = found
    parent, attr = _parent(model, stack_path)
    setattr(parent, attr, nn.ModuleList(list(getattr(parent, attr)._modules.values())))
    for key, hook in list(model._forward_pre_hooks.items()):
        if getattr(hook, "__self__", None) is controller:
            del model._forward_pre_hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)
    del model._optpass_dit_cache


@contextmanager
def block_cache(model: nn.Module, stack_path: str, policy: CachePolicy, **kwargs: Any) -> Iterator[BlockCacheController]:
    """`with block_cache(policy_net, "blocks", make_policy("taylorseer", threshold=3)):` for any iterative
    sampler whose blocks repeat per step (diffusion policies, flow matching); removed in `finally`."""
    controller = install_block_cache(model, stack_path, policy, **kwargs)
    try:
        yield controller
    finally:
        remove_block_cache(model)
