"""What a streamed run writes besides the weights, in the shapes `optpass.save` gives them: the tensor list
(from the rebuilt meta model, tied tensors once), the Hugging Face files, `optpass_state.json`, and the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from optpass.passes.quantize import QuantizeConfig
from optpass.report import CandidateRecord, OptimizationReport, PassRecord
from optpass.streaming.shards import ShardReader
from optpass.streaming.writer import SafetensorsWriter, TensorSpec

SCHEMES = {"int4": ("int4", True), "int8": ("int8", False), "int8_grouped": ("int8", True)}


def output_specs(meta: nn.Module) -> tuple[list[TensorSpec], dict[str, str]]:
    """Name, dtype, shape of every stored tensor, from the rebuilt meta model; tied tensors stored once."""
    specs, aliases, first = [], {}, {}
    for name, t in meta.state_dict(keep_vars=True).items():
        if id(t) in first:
            aliases[name] = first[id(t)]
            continue
        first[id(t)] = name
        specs.append(TensorSpec(name, t.dtype, tuple(t.shape)))
    return specs, aliases


def write_hf_files(meta: nn.Module, source: Path, out: Path) -> None:
    """config.json (tie dropped when the head is quantized, as the in-memory pass records it), the generation
    config and the tokenizer, as `optpass.save` writes them."""
    from transformers import GenerationConfig

    from optpass.sources import _local_tokenizer

    meta.config.save_pretrained(str(out))
    if (source / "generation_config.json").exists():
        GenerationConfig.from_pretrained(str(source)).save_pretrained(str(out))
    else:
        GenerationConfig.from_model_config(meta.config).save_pretrained(str(out))
    tokenizer = _local_tokenizer(source)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def prefill_kernel_recorded(layout: dict[str, dict[str, Any]]) -> bool:
    """As the in-memory pass: quantized blocks run their long prefills on the bf16 attention kernel where it is
    built (`optpass.load` installs it; the after-the-fact check measures the loaded model, so with it)."""
    from optpass.backends.cpu import prefill_attention

    return prefill_attention.available() and any(path.startswith("model.layers.") for path in layout)


def state_record(fmt: str, version: int, target: str, model_class: str, cfg: QuantizeConfig,
                 layout: dict[str, dict[str, Any]], writer: SafetensorsWriter, aliases: dict[str, str],
                 weights_file: str) -> dict[str, Any]:
    """`optpass_state.json` as `optpass.save` writes it for a model the quantize pass changed."""
    import optpass
    from optpass.backends.runtime import DecodePlan

    runtime = DecodePlan()
    if cfg.fast_decode:
        runtime = runtime.merge("quantize", {"compiled_step": True, "max_cache_len": cfg.max_cache_len})
    return {
        "format": fmt, "format_version": version, "optpass_version": optpass.__version__,
        "torch_version": torch.__version__, "target": target,
        "base": {"library": "transformers", "class": model_class, "dtype": "torch.float32"},
        "passes": [{"name": "quantize", "config": cfg.to_dict(),
                    "state": {"modules": layout, "prefill_attention": prefill_kernel_recorded(layout)}}],
        "runtime": runtime.to_dict() if not runtime.empty else None,
        "weights": {weights_file: {"sha256": writer.sha256, "tensors": len(writer.specs)}},
        "aliases": aliases,
    }


def build_report(meta: nn.Module, target: str, budget: Any, cfg: QuantizeConfig, layout: dict[str, dict[str, Any]],
                 quality: dict[str, float], reference: dict[str, float], details: dict[str, Any], notes: list[str],
                 reader: ShardReader, writer: SafetensorsWriter, seconds: float) -> OptimizationReport:
    """The report `optimize()` gives, filled from what this path did (one applied quantize pass, fixed schemes)."""
    from optpass.backends.cpu.quant_linear import QuantizedLinear

    config = meta.config
    linears = [p for p, spec in layout.items() if spec["scheme"] != "head_rows"]  # not the shared embedding
    blocks = [p for p in linears if p != "lm_head"]
    labels = {g: f"{g} {_label(choice, cfg.group_size)}"
              for g, choice in (("blocks", cfg.weights), ("lm_head", cfg.lm_head))}
    report = OptimizationReport(
        target=target, model=type(meta).__name__, budget=budget.to_dict(),
        capture={"method": "streaming (meta skeleton, one block at a time)", "blocks": config.num_hidden_layers,
                 "attentions": config.num_hidden_layers,
                 "heads (q, kv)": [(config.num_attention_heads, config.num_key_value_heads)],
                 "linears": sum(isinstance(m, (nn.Linear, QuantizedLinear)) for m in meta.modules())})
    report.candidates = [CandidateRecord("quantize", labels["blocks"], len(blocks), True, "fixed scheme (streaming)")]
    if "lm_head" in layout:
        report.candidates.append(CandidateRecord("quantize", labels["lm_head"], 1, True, "fixed scheme (streaming)"))
    kept = {"blocks": {"kept": labels["blocks"] if blocks else "float", "tried": []},
            "lm_head": {"kept": labels["lm_head"] if "lm_head" in layout else "float", "tried": []}}
    runtime = {"compiled_step": True, "max_cache_len": cfg.max_cache_len} if cfg.fast_decode else {}
    if len(linears) < len(layout):
        details = {**details, "input embedding": "model.embed_tokens reads the quantized head's rows (float table "
                   "not stored)"}
    report.passes = [PassRecord("quantize", "applied", sites=linears, quality=quality, seconds=seconds,
                                config=cfg.to_dict(), details={**kept, **details}, runtime=runtime)]
    report.quality_reference, report.quality_final = reference, quality
    report.memory = {"baseline_bytes": reader.fp32_bytes(), "optimized_bytes": writer.path.stat().st_size,
                     "predicted_optimized_bytes": writer.bytes}  # the header's sizes, known before any block ran
    report.notes = notes
    return report


def _label(choice: str, group_size: int) -> str:
    scheme, grouped = SCHEMES.get(choice, (choice, False))
    return f"{scheme}" + (f" g{group_size}" if grouped else "")

