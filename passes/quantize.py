"""Weight quantization: nn.Linear [N, K] fp32 -> int8 (per channel) or int4 (per group) weight-only, with
W8A8 dynamic above the cost model's row crossover, lowered to `backends/cpu/quant_linear.py` kernels.

Sites come from the captured graph in two decision groups: the blocks' linears, and the LM head (its own
decision, since quantizing it moves quality most). Each group is a decision whose options are its schemes,
fastest predicted first; `cost_models.selection.choose_within_budget` keeps the first whose measured quality
stays within the budget (e.g. int4 blocks with an int8 head). Optional activation-aware scaling (AWQ, Lin et al. 2024) runs first
for int4. Causal LMs also ask the decode runtime for a compiled static-shape step (`backends/runtime/`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from optpass.backends.cpu import prefill_attention
from optpass.backends.cpu.head_embedding import (HeadRowsEmbedding, from_record, layout_record, module_path, set_module,
                                                share_head_rows, share_reason)
from optpass.backends.cpu import gemv_ops
from optpass.backends.cpu.quant_linear import Int4Linear, Int8Linear, QuantizedLinear, int4_supported
from optpass.cost_models.hardware import HardwareSpec
from optpass.cost_models.model_cost import overrides_for, rewrite_estimate
from optpass.cost_models.quantization import w8a8_crossover, weight_bytes
from optpass.errors import ConfigError
from optpass.cost_models.selection import fastest_first
from optpass.pass_base import Alternatives, ApplyContext, Candidate, Option, Outcome, Pass, PassConfig, PassResult
from optpass.registry import register_pass
from optpass.sites import LinearSite, ModelGraph

GROUP_SIZES = (32, 64, 128)
WEIGHT_CHOICES = ("auto", "int8", "int8_grouped", "int4")
HEAD_CHOICES = ("auto", "int8", "int8_grouped", "int4", "keep")
# (scheme, grouped): int4 is always per group; int8 per output channel or per group of `group_size` inputs
Scheme = tuple[str, bool]
_CHOICES: dict[str, tuple[Scheme, ...]] = {"auto": (("int4", True), ("int8", False), ("int8", True)),
                                           "int8": (("int8", False),), "int8_grouped": (("int8", True),),
                                           "int4": (("int4", True),)}


@dataclass(frozen=True)
class QuantizeConfig(PassConfig):
    # blocks: "int8" (per channel), "int8_grouped" (a scale per `group_size` inputs: GGUF-derived weights re-pack
    # exactly), "int4", or "auto" (every one of them; the cost model ranks, the quality budget decides)
    weights: str = "auto"
    group_size: int = 32  # int4 / grouped-int8 group along K: 32 | 64 | 128
    lm_head: str = "auto"  # the output head: "auto" | "int8" | "int8_grouped" | "int4" | "keep"
    awq: bool = False  # activation-aware scaling before int4 (needs calibration data)
    # int8 layers switch to W8A8 (int8 activations) above the cost model's row crossover. Off by default:
    # per-token activation quantization without smoothing costs SmolLM2 +5.5% perplexity (see README).
    w8a8: bool = False
    fast_decode: bool = True  # causal LMs: compiled static-shape greedy decode behind generate()
    max_cache_len: int = 1024
    skip: tuple[str, ...] = ()  # module path prefixes to leave in float

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_CHOICES:
            raise ConfigError(f"QuantizeConfig.weights={self.weights!r}; allowed: {WEIGHT_CHOICES}")
        if self.group_size not in GROUP_SIZES:
            raise ConfigError(f"QuantizeConfig.group_size={self.group_size}; allowed: {GROUP_SIZES}")
        if self.lm_head not in HEAD_CHOICES:
            raise ConfigError(f"QuantizeConfig.lm_head={self.lm_head!r}; allowed: {HEAD_CHOICES}")
        if self.max_cache_len < 2:
            raise ConfigError(f"QuantizeConfig.max_cache_len={self.max_cache_len}; must be >= 2")


def _schemes(choice: str) -> tuple[Scheme, ...]:
    return _CHOICES[choice]


@register_pass
class QuantizePass(Pass):
    name = "quantize"
    config_cls = QuantizeConfig
    needs_calibration = True

    def candidates(self, graph: ModelGraph, target: HardwareSpec) -> list[Candidate]:
        cfg = self.config
        sites = [s for s in graph.linears if not any(s.name.startswith(p) for p in cfg.skip)]
        if not sites:
            return [Candidate.skip(self.name, (), "no linear layers to quantize")]
        groups = {"blocks": [s for s in sites if not s.is_output_head],
                  "lm_head": [s for s in sites if s.is_output_head]}
        options = {"blocks": _schemes(cfg.weights), "lm_head": () if cfg.lm_head == "keep" else _schemes(cfg.lm_head)}
        found: list[Candidate] = []
        for group, members in groups.items():
            for scheme, grouped in options[group]:
                found.extend(self._candidate(group, scheme, grouped, members, graph, target))
        return found

    def _candidate(self, group: str, scheme: str, grouped: bool, sites: list[LinearSite], graph: ModelGraph,
                   target: HardwareSpec) -> list[Candidate]:
        gs = self.config.group_size if grouped else None
        label = f"{group} {scheme}" + (f" g{gs}" if gs else "")
        reasons = {s.name: _group_supported(scheme, s, gs) for s in sites} if gs else {}
        ok = [s for s in sites if not reasons.get(s.name)]
        out = [Candidate.skip(self.name, (name,), f"{label}: {why}", label=label) for name, why in reasons.items() if why]
        if not ok:
            return out
        # a tied head's float table goes too: the input embedding then reads the quantized head's rows
        d_mem = sum(weight_bytes(s, scheme, gs) - weight_bytes(s, "fp32") for s in ok)
        d_mem += sum(_kernel_copy_bytes(scheme, s, gs, target) for s in ok)
        w8a8 = None
        if self.config.w8a8 and scheme == "int8" and not gs:
            w8a8 = min((c for s in ok if (c := w8a8_crossover(s, target)) is not None), default=None)
        # quantized blocks attend long prefills with the bf16 kernel (`_swapper`): part of what the estimate prices
        kernel = group == "blocks" and target.kind == "cpu" and graph.model_kind == "causal_lm" \
            and prefill_attention.available()
        params = {"group": group, "scheme": scheme, "group_size": gs, "w8a8_min_rows": w8a8,
                  "prefill_attention": kernel}
        overrides = overrides_for([Candidate(self.name, tuple(s.name for s in ok), params)])
        out.append(Candidate(self.name, tuple(s.name for s in ok), params,
                             rewrite_estimate(graph, target, overrides, d_mem), label=label))
        return out

    def decisions(self, model: nn.Module, chosen: list[Candidate], context: ApplyContext) -> list[Alternatives]:
        """Two decisions, blocks and LM head, each its schemes fastest predicted first."""
        self._notes: dict[str, Any] = {}
        self._chosen = chosen
        out = []
        for group in ("blocks", "lm_head"):
            ranked = fastest_first([c for c in chosen if c.params["group"] == group])
            out.append(Alternatives(group, [Option(c.label, self._swapper(c, context), value=c) for c in ranked]))
        return out

    def _swapper(self, cand: Candidate, context: ApplyContext) -> Any:
        def apply(model: nn.Module) -> Any:
            originals = _swap(model, cand, self.config, context, self._notes)
            # quantized blocks run their prefill GEMMs on bf16 (or int8) activations: their attention prefill runs the
            # bf16 kernel too, inside the option the budget measures
            undo_attention = prefill_attention.install(model) if cand.params.get("prefill_attention") else None

            def undo() -> None:
                if undo_attention is not None:
                    undo_attention()
                _restore(model, originals)
            return undo
        return apply

    def finish(self, model: nn.Module, kept: dict[str, Option | None], outcomes: dict[str, list[Outcome]],
               context: ApplyContext) -> PassResult:
        groups = {g: {"kept": kept[g].label if kept.get(g) else "float", "tried": [o.to_dict() for o in tried]}
                  for g, tried in outcomes.items()}
        sites = [s for option in kept.values() if option is not None for s in option.value.sites]
        tried_all = [t for g in groups.values() for t in g["tried"]]
        if not sites:
            return PassResult(self.name, model, False, details=groups, reason="no scheme stayed within the quality "
                              "budget: " + "; ".join(f"{t['label']}: {t['why']}" for t in tried_all))
        kept_labels = {g["kept"] for g in groups.values()}
        not_kept = {t["label"]: t["why"] for t in tried_all if t["label"] not in kept_labels}
        for cand in self._chosen:
            group = groups[cand.params["group"]]
            if cand.label != group["kept"]:
                not_kept.setdefault(cand.label, f"{group['kept']} was kept first")
        decisions: dict[str, Any] = {**groups, **self._notes, "not_kept": not_kept}
        if prefill_attention.installed(model):
            decisions["prefill_attention"] = (f"long prefills (>= {prefill_attention.MIN_ROWS} rows) of full-attention "
                                              "layers run optpass's bf16 flash kernel (bf16 inputs, fp32 sums), "
                                              "measured with the blocks")
        _tie_embedding(model)
        runtime = {}
        if self.config.fast_decode and hasattr(model, "generate") and hasattr(model, "config"):
            runtime = {"compiled_step": True, "max_cache_len": self.config.max_cache_len}
            decisions["fast_decode"] = f"static cache {self.config.max_cache_len}, compiled on first generate()"
        return PassResult(self.name, model, True, tuple(sites), details=decisions, runtime=runtime)

    def saved_state(self, model: nn.Module) -> dict[str, Any]:
        """The quantized-module layout (scheme, shapes, group size per path)."""
        return {"modules": quantized_modules(model), "prefill_attention": prefill_attention.installed(model)}

    def restore(self, model: nn.Module, state: dict[str, Any]) -> nn.Module:
        """Empty quantized modules at the recorded paths (tensors come from the checkpoint), no recalibration."""
        rebuild_quantized(model, state.get("modules", {}))
        _tie_embedding(model)
        if state.get("prefill_attention"):  # where the kernel is not built here, the model's own attention runs
            prefill_attention.install(model)
        return model

    def rewrite_graph(self, gm: fx.GraphModule, chosen: list[Candidate]) -> PassResult:
        """Replace each chosen `linear(x, W, b)` call by a call to a quantized module built from W's value.
        Per decision group the fastest predicted scheme wins (no quality guard on this path); weights come
        from get_attr parameters or, for dynamo graphs, from the placeholder's `optpass_value` meta."""
        from optpass.passes.quantize_graph import quantize_linear_calls

        best: dict[str, Candidate] = {}
        for cand in fastest_first(chosen):
            best.setdefault(cand.params["group"], cand)
        if not best:
            return PassResult(self.name, gm, False, reason="no quantization candidate was chosen")
        done, skipped = quantize_linear_calls(gm, list(best.values()))
        details = {"kept": {g: c.label for g, c in best.items()}, "skipped": skipped}
        return PassResult(self.name, gm, bool(done), tuple(done), details=details,
                          reason="" if done else "no chosen linear call has a constant float weight")


def _kernel_copy_bytes(scheme: str, site: LinearSite, group_size: int | None, target: HardwareSpec) -> int:
    """Resident bytes of the layout a CPU kernel reads beside the canonical tensors (derived, not saved):
    int8's packed copy on VNNI CPUs; for int4 either its packed copy (VNNI) or tinygemm's, both nibbles plus two
    16-bit values (scale and offset) per group."""
    if target.kind != "cpu":
        return 0
    n, k = site.out_features, site.in_features
    if scheme == "int8":
        return n * k if gemv_ops.packed_available() else 0
    return n * k // 2 + 4 * n * k // (group_size or k)


def _group_supported(scheme: str, site: LinearSite, group_size: int) -> str | None:
    if scheme == "int4":
        return int4_supported(site.in_features, site.out_features, group_size)
    return f"in_features {site.in_features} is not divisible by group_size {group_size}" \
        if site.in_features % group_size else None


def _swap(model: nn.Module, cand: Candidate, cfg: QuantizeConfig, context: ApplyContext,
          notes: dict[str, Any]) -> dict[str, nn.Module]:
    """Replace each site's nn.Linear with its quantized module; return the originals for rollback.
    AWQ scaling is function-preserving in float, so a rolled-back candidate leaves an equivalent model."""
    scheme, gs = cand.params["scheme"], cand.params["group_size"]
    originals = _linearize(model, cand.sites)  # GPT-2 Conv1D -> the equivalent nn.Linear, so one code path follows
    if scheme == "int4" and cfg.awq and context.calibration and context.graph is not None:
        from optpass.passes.awq import apply_awq

        awq = apply_awq(model, cand.sites, gs, context.calibration, context.graph)
        notes[f"awq {cand.label}"] = {"mean_alpha": sum(awq["alphas"].values()) / max(len(awq["alphas"]), 1),
                                      "groups": len(awq["alphas"]), "unscaled": awq["unscaled"]}
    for path in cand.sites:
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        linear = getattr(parent, attr)
        if not isinstance(linear, nn.Linear):
            continue
        originals.setdefault(path, linear)
        new = (Int8Linear.from_linear(linear, w8a8_min_rows=cand.params.get("w8a8_min_rows"), group_size=gs)
               if scheme == "int8" else Int4Linear.from_linear(linear, gs))
        setattr(parent, attr, new)
        if cand.params["group"] == "lm_head":
            _share_with_embedding(model, linear, new, originals, notes)
    return originals


def _share_with_embedding(model: nn.Module, head: nn.Linear, quantized: QuantizedLinear,
                          originals: dict[str, nn.Module], notes: dict[str, Any]) -> None:
    """A tied input embedding reads its rows from the quantized head, so the float table is freed (one
    decision with the head: measured and rolled back together); otherwise the note says why it stays."""
    why = share_reason(model, head)
    if why:
        notes["input embedding"] = f"keeps its float table: {why}"
        return
    path, embedding = share_head_rows(model, quantized)
    originals.setdefault(path, embedding)
    notes["input embedding"] = f"{path} reads the quantized head's rows (float table freed)"


def as_linear(module: nn.Module) -> nn.Linear | None:
    """`module` if it is an `nn.Linear`; the equivalent `nn.Linear` of a transformers `Conv1D` (GPT-2 stores
    its weight [in, out] and computes addmm(b, x, W)); None for anything else."""
    if isinstance(module, nn.Linear):
        return module
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always ships it
        return None
    if not isinstance(module, Conv1D):
        return None
    k, n = module.weight.shape
    linear = nn.Linear(k, n, bias=module.bias is not None, device=module.weight.device, dtype=module.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(module.weight.t())
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear.requires_grad_(False)


def _linearize(model: nn.Module, paths: tuple[str, ...]) -> dict[str, nn.Module]:
    """Swap each Conv1D at `paths` for its equivalent nn.Linear; returns the replaced modules."""
    replaced = {}
    for path in paths:
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        module = getattr(parent, attr)
        linear = as_linear(module)
        if linear is not None and linear is not module:
            replaced[path] = module
            setattr(parent, attr, linear)
    return replaced


def _restore(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    for path, module in originals.items():
        set_module(model, path, module)


def _tie_embedding(model: nn.Module) -> None:
    """The head and the input embedding are no longer one float parameter (the embedding reads the quantized
    head's rows, or keeps its float table where it cannot); HF's `tie_weights()` must not re-tie a float
    weight over the quantized head, so the config stops declaring the tie."""
    config = getattr(model, "config", None)
    head = getattr(model, "lm_head", None)
    if config is not None and isinstance(head, QuantizedLinear) and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False


def quantized_modules(model: nn.Module) -> dict[str, dict[str, Any]]:
    """What a checkpoint records to rebuild the quantized modules before loading their tensors."""
    out: dict[str, dict[str, Any]] = {}
    for path, m in model.named_modules():
        if isinstance(m, HeadRowsEmbedding):
            out[path] = layout_record(module_path(model, m.head), m.output_scale, m.dtype)
        if isinstance(m, Int8Linear):
            out[path] = {"scheme": "int8", "in": m.in_features, "out": m.out_features, "bias": m.bias is not None,
                         "w8a8_min_rows": m.w8a8_min_rows, "group_size": m.group_size or None}
        elif isinstance(m, Int4Linear):
            out[path] = {"scheme": "int4", "in": m.in_features, "out": m.out_features, "bias": m.bias is not None,
                         "group_size": m.group_size}
    return out


def rebuild_quantized(model: nn.Module, layout: dict[str, dict[str, Any]]) -> nn.Module:
    """Replace the listed nn.Linear modules by empty quantized ones, ready for `load_state_dict`; then point
    each shared input embedding at its rebuilt head."""
    for path, spec in layout.items():
        if spec["scheme"] == "head_rows":
            continue
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        n, k = spec["out"], spec["in"]
        bias = torch.zeros(n) if spec["bias"] else None
        if spec["scheme"] == "int8":
            gs = spec.get("group_size")
            new: nn.Module = Int8Linear(torch.zeros(n, k, dtype=torch.int8), torch.ones(n, k // gs) if gs else torch.ones(n),
                                        bias, w8a8_min_rows=spec.get("w8a8_min_rows"))
        else:
            gs = spec["group_size"]
            new = Int4Linear(torch.zeros(n, k // 2, dtype=torch.uint8), torch.ones(n, k // gs), torch.zeros(n, k // gs), gs, bias)
        setattr(parent, attr, new)
    for path, spec in layout.items():
        if spec["scheme"] == "head_rows":
            set_module(model, path, from_record(model, spec))
    return model
