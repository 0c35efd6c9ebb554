"""Block-by-block weight quantization of a Llama checkpoint directory that need not fit in memory.

The model exists only as a meta-device skeleton. Embeddings, then one decoder block at a time, are read from
the safetensors shards; calibration hidden states go through the float block (its inputs feed AWQ's scale
search, its outputs are the next block's inputs, as in AutoAWQ), the block's linears are quantized with the
same `Int4Linear` / `Int8Linear` constructors and AWQ search (`passes/awq.scale_groups`) the in-memory pass
uses, its tensors are appended to the checkpoint file and the block is freed. Peak memory: one float block
plus the calibration / verification activations (the quantized tensors go to disk as they are made).

What differs from `optimize(model, passes=["quantize"])` in memory, and why:
- schemes are fixed, not chosen by the quality guard (trying a scheme needs the whole model): blocks "auto"
  means int4, the LM head "auto" means int8 per channel (the head moves quality most);
- the quality check runs after the fact: reference logits come from the float blocks and the quantized
  logits from the quantized blocks, on the same verification windows as the in-memory guard; a result over
  the budget is reported (and warned about), not rolled back. When the fp32 model fits in memory (`optpass.load`
  builds the fp32 architecture before swapping in quantized modules), the written checkpoint is also loaded
  and its logits compared with the streamed ones, so the artifact itself is checked end to end.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from optpass.backends.cpu import prefill_attention
from optpass.backends.cpu.head_embedding import HeadRowsEmbedding, layout_record
from optpass.errors import ConfigError
from optpass.passes.awq import MAX_TOKENS, scale_groups
from optpass.passes.quantize import QuantizeConfig, QuantizePass
from optpass.progress import track
from optpass.report import OptimizationReport
from optpass.streaming.llama import BLOCK_GROUPS, HEAD_GROUP, UNSCALED, BlockRunner, check_architecture, skeleton
from optpass.streaming.memory import gib, release_freed
from optpass.streaming.quality import absolute, check_loaded, metrics
from optpass.streaming.record import (SCHEMES, build_report, output_specs, prefill_kernel_recorded, state_record,
                                     write_hf_files)
from optpass.streaming.shards import ShardReader
from optpass.streaming.writer import SafetensorsWriter

# the fixed schemes "auto" stands for here (no quality-guided choice without the whole model)
AUTO_BLOCKS, AUTO_HEAD = "int4", "int8"


@dataclass
class StreamingResult:
    """What a streamed `optimize()` returns: the checkpoint directory (load it with `optpass.load`) and the report."""

    path: Path
    report: OptimizationReport

    def load(self) -> nn.Module:
        from optpass.checkpoint import load

        return load(self.path)


def resolve_config(config: QuantizeConfig | None) -> QuantizeConfig:
    """The explicit config this path runs: "auto" replaced by its fixed scheme; W8A8 refused (its per-layer
    switch point comes from the cost model's per-site crossover, which needs the captured graph)."""
    cfg = config or QuantizeConfig()
    if cfg.w8a8:
        raise ConfigError("streaming quantization does not do W8A8 (its row crossover needs the captured whole model); "
                          "use w8a8=False")
    return replace(cfg, weights=AUTO_BLOCKS if cfg.weights == "auto" else cfg.weights,
                   lm_head=AUTO_HEAD if cfg.lm_head == "auto" else cfg.lm_head)


def plan_layout(model: nn.Module, cfg: QuantizeConfig) -> dict[str, dict[str, Any]]:
    """Quantized-module records (`passes/quantize.quantized_modules` format) for the skeleton's linears: the
    state the quantize pass saves, so `optpass.load` rebuilds exactly these modules. Shapes a scheme cannot take
    stay float, as the in-memory pass skips them."""
    from optpass.backends.cpu.quant_linear import int4_supported

    layout: dict[str, dict[str, Any]] = {}
    for path, m in model.named_modules():
        if not isinstance(m, nn.Linear) or any(path.startswith(p) for p in cfg.skip):
            continue
        choice = cfg.lm_head if path == "lm_head" else cfg.weights
        if choice == "keep":
            continue
        scheme, grouped = SCHEMES[choice]
        gs = cfg.group_size if grouped else None
        k, n, bias = m.in_features, m.out_features, m.bias is not None
        if scheme == "int4":
            if int4_supported(k, n, gs) is None:
                layout[path] = {"scheme": "int4", "in": k, "out": n, "bias": bias, "group_size": gs}
        elif not gs or k % gs == 0:
            layout[path] = {"scheme": "int8", "in": k, "out": n, "bias": bias, "w8a8_min_rows": None, "group_size": gs}
    embedding = model.model.embed_tokens
    tied = model.lm_head.weight is embedding.weight
    head_awq = cfg.awq and layout.get("lm_head", {}).get("scheme") == "int4"  # AWQ scales the head, not the lookup
    if tied and "lm_head" in layout and not head_awq and type(embedding) is nn.Embedding:
        # as the in-memory pass: the embedding reads the quantized head's rows, the float table is not stored
        layout["model.embed_tokens"] = layout_record("lm_head", 1.0, embedding.weight.dtype)
    return layout


CHUNK_ELEMENTS = 1 << 20  # weight elements quantized at a time: the temporaries stay ~4 MiB for any layer


def quantize_linear(linear: nn.Linear, spec: dict[str, Any]) -> nn.Module:
    """What `Int4Linear.from_linear` / `Int8Linear.from_linear` build, quantized a slab of rows at a time (every
    scale is per row or per row-group, so the integers are identical), so a vocabulary-sized head does not need
    several fp32-head-sized temporaries."""
    from optpass.backends.cpu.quant_linear import Int4Linear, Int8Linear
    from optpass.backends.quant_format import pack_int4, quantize_int4, quantize_int8

    w, gs = linear.weight.detach(), spec["group_size"]
    step = max(1, CHUNK_ELEMENTS // w.shape[1])
    slabs = [w[a:a + step] for a in range(0, w.shape[0], step)]
    if spec["scheme"] == "int4":
        parts = [quantize_int4(slab, gs) for slab in slabs]
        packed = torch.cat([pack_int4(q) for q, _, _ in parts])
        scale, zero = torch.cat([s for _, s, _ in parts]), torch.cat([z for _, _, z in parts])
        del parts
        return Int4Linear(packed, scale, zero, gs, linear.bias)
    parts8 = [quantize_int8(slab, gs) for slab in slabs]
    return Int8Linear(torch.cat([q for q, _ in parts8]), torch.cat([s for _, s in parts8]), linear.bias)


def _linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


def _swap_linears(module: nn.Module, prefix: str, layout: dict[str, dict[str, Any]]) -> int:
    """Replace the listed linears by their quantized modules, each float weight freed as soon as it is replaced."""
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and prefix + n in layout]
    for name in names:
        parent_path, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        setattr(parent, attr, quantize_linear(getattr(parent, attr), layout[prefix + name]))
        release_freed()
    return len(names)


def token_batches(config: Any, data: Any, purpose: str) -> tuple[list[torch.Tensor], str]:
    """Token ids per batch, chosen as `CausalLMAdapter.data_batches` chooses them for the in-memory pass (the
    checkpoint's tokenizer on corpus windows, else random ids), so both paths calibrate on the same tokens."""
    from optpass.adapters import Batch, CausalLMAdapter

    batches, note = CausalLMAdapter().data_batches(SimpleNamespace(config=config), data, purpose, Batch())
    out = []
    for b in batches:
        kwargs = b.kwargs or {}
        ids = kwargs.get("input_ids", b.args[0] if b.args else None)
        mask = kwargs.get("attention_mask")
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
            raise ConfigError("streaming quantization calibrates on token ids: give calibration_data as an int tensor "
                              "[n, S] or batches with input_ids")
        if mask is not None and not bool(mask.bool().all()):
            raise ConfigError("streaming quantization takes unpadded calibration batches (attention_mask all ones)")
        out.append(ids.view(-1, ids.shape[-1]))
    return out, note


class _Rows:
    """Forward pre-hooks keeping the first MAX_TOKENS input rows of each listed linear (as `awq._collect_inputs`)."""

    def __init__(self, module: nn.Module, paths: list[str]) -> None:
        self.seen: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
        self.handles = [module.get_submodule(p).register_forward_pre_hook(self._hook(p)) for p in paths]

    def _hook(self, path: str) -> Any:
        def keep(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            self.seen[path].append(x.reshape(-1, x.shape[-1])[:MAX_TOKENS].float())
        return keep

    def close(self) -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        return {p: torch.cat(v)[:MAX_TOKENS] for p, v in self.seen.items() if v}


def _scalable(groups: tuple[dict[str, Any], ...] | list[dict[str, Any]], prefix: str,
              layout: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups whose every linear is int4 (a group with a float member is left unscaled, as `fold_groups` does)."""
    return [g for g in groups if all(layout.get(prefix + p, {}).get("scheme") == "int4" for p in g["linears"])]


class _Head(nn.Module):
    """The final norm and the LM head as one module, so AWQ's fold ("norm", "norm") applies to the head."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        self.norm, self.lm_head = norm, lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))


def quantize_streaming(source: str | Path, output: str | Path | None = None, config: QuantizeConfig | None = None,
                       target: str = "cpu", calibration_data: Any = None, quality_budget: Any = None,
                       check_load: bool | None = None) -> StreamingResult:
    """Quantize the Llama checkpoint directory `source` block by block into an optpass checkpoint at `output`
    (default: `<source>-optpass`); see the module docstring. `check_load`: also load the written checkpoint and
    compare its logits (None: only when the fp32 model fits in available memory)."""
    from optpass.api import resolve_budget
    from optpass.checkpoint import FORMAT, FORMAT_VERSION, STATE_FILE, WEIGHTS_FILE
    from optpass.cost_models import get_spec
    from optpass.adapters import CausalLMAdapter
    from transformers import AutoConfig

    start = time.perf_counter()
    source = Path(source)
    if not (source / "config.json").exists():
        raise ConfigError(f"{source}: streaming quantization needs a Hugging Face model directory (config.json)")
    hf_config = AutoConfig.from_pretrained(str(source), local_files_only=True)
    hf_config._name_or_path = str(source)
    hf_config.dtype = torch.float32  # computed and stored in fp32, as the in-memory path loads it
    check_architecture(hf_config, str(source))
    cfg = resolve_config(config)
    spec = get_spec(target)
    budget = resolve_budget(quality_budget, "causal_lm")
    budget.check_measurable(CausalLMAdapter.metrics, "causal_lm")
    reader = ShardReader(source)
    out = Path(output) if output is not None else source.with_name(source.name + "-optpass")
    if out.resolve() == source.resolve():
        raise ConfigError(f"{out}: the output must not be the source directory (its config.json would be replaced "
                          "while its shards are read)")
    out.mkdir(parents=True, exist_ok=True)
    (out / STATE_FILE).unlink(missing_ok=True)  # a previous run's record must not vouch for new weights

    meta = skeleton(hf_config)
    layout = plan_layout(meta, cfg)
    tied = meta.lm_head.weight is meta.model.embed_tokens.weight
    rebuilt = skeleton(hf_config)
    with torch.device("meta"):  # the very rebuild `optpass.load` runs: the stored names, dtypes and shapes
        QuantizePass(cfg).restore(rebuilt, {"modules": layout})
    specs, aliases = output_specs(rebuilt)
    write_hf_files(rebuilt, source, out)

    calib, calib_note = token_batches(hf_config, calibration_data, "calibrate")
    verify, verify_note = token_batches(hf_config, calibration_data, "verify")
    runner = BlockRunner(meta, reader)
    prefill_kernel = prefill_kernel_recorded(layout)
    writer = SafetensorsWriter(out / WEIGHTS_FILE, specs, metadata={"format": FORMAT})
    head_spec = layout.get("lm_head")
    awq = cfg.awq
    head_awq = awq and head_spec is not None and head_spec["scheme"] == "int4"
    alphas: dict[str, float] = {}
    unscaled: list[str] = []
    try:
        with torch.no_grad():
            embed = reader.read("model.embed_tokens.weight")
            calib_f = [F.embedding(ids, embed) for ids in calib]
            ver_f = [F.embedding(ids, embed) for ids in verify]
            ver_q, calib_q = list(ver_f), (list(calib_f) if head_awq else None)
            if "model.embed_tokens" in layout:  # looked up in the quantized head: its rows, quantized alike
                lookup = HeadRowsEmbedding(quantize_linear(_linear(embed), layout["lm_head"]))
                ver_q = [lookup(ids) for ids in verify]
                del lookup
            else:
                writer.write("model.embed_tokens.weight", embed)
            del embed
            for i in track(range(runner.layers), "optpass streaming quantize", total=runner.layers):
                prefix = f"model.layers.{i}."
                block = runner.block(i)
                groups = _scalable(BLOCK_GROUPS, prefix, layout) if awq else []
                rows = _Rows(block, [g["linears"][0] for g in groups])
                calib_f = runner.forward(block, calib_f)
                inputs = rows.close()
                ver_f = runner.forward(block, ver_f)
                release_freed()
                if groups:
                    found = scale_groups(block, groups, inputs, cfg.group_size)
                    alphas.update({",".join(prefix + p for p in k.split(",")): a for k, a in found.items()})
                    unscaled += [prefix + p for p in UNSCALED if prefix + p in layout]
                del inputs
                _swap_linears(block, prefix, layout)
                if prefill_kernel:  # as the loaded checkpoint will attend (`record.state_record`)
                    prefill_attention.mark_attention(block.self_attn)
                release_freed()
                ver_q = runner.forward(block, ver_q)
                if calib_q is not None:
                    calib_q = runner.forward(block, calib_q)
                for name, tensor in block.state_dict().items():
                    writer.write(prefix + name, tensor)
                del block
                release_freed()
            ref_logits, q_logits = _finish_head(runner, writer, reader, meta, layout, tied, ver_f, ver_q, calib_q,
                                                cfg.group_size, alphas)
        writer.close()
        quantized_at = time.perf_counter()
    except BaseException:
        writer.abort()
        raise
    state = state_record(FORMAT, FORMAT_VERSION, spec.name, type(meta).__name__, cfg, layout, writer, aliases,
                         WEIGHTS_FILE)
    (out / STATE_FILE).write_text(json.dumps(state, indent=2, default=str))

    reference = absolute(ref_logits, verify)
    quality = metrics(ref_logits, q_logits, verify, reference)
    notes = [f"quantized block by block from {source} (fp32 size {gib(reader.fp32_bytes())}): schemes fixed "
             f"(blocks {cfg.weights}, lm_head {cfg.lm_head}); the quality guard's choice between schemes and its "
             "rollback need the whole model and did not run",
             f"quality measured after the fact on {verify_note}: float blocks vs quantized blocks, block by block; "
             f"calibration on {calib_note}"]
    loaded = check_loaded(out, verify, q_logits, ref_logits, reference, reader.fp32_bytes(), writer.bytes, check_load)
    notes.append(loaded["note"])
    if loaded.get("quality"):
        quality = loaded["quality"]
    over = budget.violations(quality) if quality.get("finite", 1.0) >= 1.0 else ["outputs contain NaN or inf"]
    if over:
        warnings.warn(f"optpass: streamed quantization is over the quality budget ({'; '.join(over)}); the checkpoint "
                      f"was written to {out} (there is no rollback without the whole model)", stacklevel=3)
        notes.append("over the quality budget: " + "; ".join(over))
    details = {"streaming": {"blocks": runner.layers, "source": str(source), "checked_load": loaded["checked"],
                             **({"logits_max_abs_diff": loaded["max_abs_diff"]} if loaded["checked"] else {})}}
    if awq:
        details["awq"] = {"mean_alpha": sum(alphas.values()) / max(len(alphas), 1), "groups": len(alphas),
                          "unscaled": unscaled, "alphas": alphas}
    report = build_report(rebuilt, spec.name, budget, cfg, layout, quality, reference, details, notes, reader, writer,
                     seconds=quantized_at - start)
    report.seconds = time.perf_counter() - start
    return StreamingResult(out, report)


def _finish_head(runner: BlockRunner, writer: SafetensorsWriter, reader: ShardReader, meta: nn.Module,
                 layout: dict[str, dict[str, Any]], tied: bool, ver_f: list[torch.Tensor], ver_q: list[torch.Tensor],
                 calib_q: list[torch.Tensor] | None, group_size: int,
                 alphas: dict[str, float]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Final norm + LM head: reference logits from the float head, AWQ (int4 head: on the quantized blocks'
    outputs, as the in-memory pass sees them after the blocks' decision), quantized logits; written last."""
    norm = runner.materialize("model.norm.", meta.model.norm)
    head_key = "model.embed_tokens.weight" if tied or "lm_head.weight" not in reader else "lm_head.weight"
    weight = reader.read(head_key)
    has_bias = "lm_head.bias" in reader
    lm_head = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
    lm_head.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        lm_head.bias = nn.Parameter(reader.read("lm_head.bias"), requires_grad=False)
    head = _Head(norm, lm_head).eval()
    ref_logits = [head(h) for h in ver_f]
    if calib_q is not None:
        rows = _Rows(head, ["lm_head"])
        for h in calib_q:
            head(h)
        alphas.update(scale_groups(head, [HEAD_GROUP], rows.close(), group_size))
    _swap_linears(head, "", {"lm_head": layout["lm_head"]} if "lm_head" in layout else {})
    q_logits = [head(h) for h in ver_q]
    writer.write("model.norm.weight", head.norm.weight)
    for name, tensor in head.lm_head.state_dict().items():
        if "lm_head" in layout or not tied:
            writer.write(f"lm_head.{name}", tensor)
    del head, lm_head, weight
    release_freed()
    return ref_logits, q_logits
