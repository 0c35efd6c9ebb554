"""`optpass.save(model, "out.gguf", format="gguf")`: an optimized Llama as one GGUF file llama.cpp / Ollama load.

optpass's calibrated choices travel as weights: int4 g32 (and g64 / g128) blocks become Q4_1, int8 per-channel
or grouped ones Q8_0, with their 4 / 8-bit codes unchanged and only the scales / minimums rounded to fp16
(how exact each mapping is: `gguf_blocks`); AWQ scales are already folded into the weights; a head kept at int8
is written as its own `output.weight` even where the float embedding it was tied to stays lossless; each layer
keeps its own precision; blocks removed by layer skipping are left out and the others renumbered.
Names, metadata and the q / k row order follow llama.cpp's `convert_hf_to_gguf.py` (`LlamaModel`): HF stores
each head's rotary dimensions as two halves, GGUF interleaves them, so q / k rows are permuted, rows only,
which leaves every quantized block intact. optpass's state record (passes, the decisions llama.cpp cannot
reproduce, the weight error measured here) is stored under the `optpass.state` key.
Llama-architecture causal LMs only (LlamaForCausalLM, default or linear RoPE, no biases).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from optpass.errors import ExportError
from optpass.export.common import LinearWeights, error_summary, export_state, kept_blocks, linear_weights
from optpass.export.gguf_blocks import lossless_float, per_block, q4_1, q8_0
from optpass.export.gguf_vocab import add_tokenizer

STATE_KEY = "optpass.state"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def check_llama(model: nn.Module) -> dict[str, Any]:
    """The hyper-parameters GGUF's llama architecture needs; anything it cannot express is an `ExportError`."""
    config = getattr(model, "config", None)
    name = type(model).__name__
    if name != "LlamaForCausalLM" or getattr(config, "model_type", None) != "llama":
        raise ExportError(f"gguf export: {name} ({getattr(config, 'model_type', None)}) is not supported; optpass "
                          "writes GGUF for Llama-architecture causal LMs (LlamaForCausalLM) only")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise ExportError(f"gguf export: config.{flag}=True (biases) is not supported")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ExportError(f"gguf export: hidden_act={config.hidden_act!r}; llama.cpp's llama uses silu")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "linear"):
        raise ExportError(f"gguf export: RoPE type {rope_type!r} is not supported (default or linear only)")
    heads = config.num_attention_heads
    return {"hidden": config.hidden_size, "ffn": config.intermediate_size, "heads": heads,
            "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
            "context": config.max_position_embeddings, "eps": config.rms_norm_eps, "vocab": config.vocab_size,
            "rope_theta": float(rope["rope_theta"]), "rope_type": rope_type, "rope_factor": rope.get("factor")}


def rope_row_order(rows: int, heads: int) -> torch.Tensor:
    """Row index i of the GGUF q / k weight = HF row order[i] (`LlamaModel.permute`: per head, the two rotary
    halves [0..d/2), [d/2..d) interleaved)."""
    idx = torch.arange(rows)
    return idx.reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)


def _step(lw: LinearWeights) -> torch.Tensor:
    """The quantization step of each 32-block [N, K / 32] (for errors in steps)."""
    return per_block(lw.scale, lw.group_size, lw.in_features)


def encode_linear(lw: LinearWeights, smallest: bool = True
                  ) -> tuple[np.ndarray, str, torch.Tensor, torch.Tensor | None]:
    """(GGUF data, GGML type name, the weight llama.cpp computes with, step per 32-block or None)."""
    if lw.kind == "int4":
        raw, weight = q4_1(lw)
        return raw, "Q4_1", weight, _step(lw)
    if lw.kind == "int8":
        raw, weight = q8_0(lw)
        return raw, "Q8_0", weight, _step(lw)
    raw, kind = lossless_float(lw.weight, smallest)
    return raw, kind, lw.weight.float(), None


class _Tensors:
    """Collects GGUF tensors and the error of each against optpass's weights."""

    def __init__(self, writer: Any, smallest: bool) -> None:
        self.writer, self.smallest, self.types, self.errors = writer, smallest, Counter(), []

    def add(self, name: str, data: np.ndarray, kind: str) -> None:
        import gguf

        quant = gguf.GGMLQuantizationType[kind]
        self.writer.add_tensor(name, data, raw_dtype=quant if kind not in ("F32", "F16") else None)
        self.types[kind] += 1

    def linear(self, name: str, lw: LinearWeights) -> None:
        raw, kind, weight, step = encode_linear(lw, self.smallest)
        self.add(name, raw, kind)
        self.errors.append((name, weight, lw.dequantized(), step))

    def vector(self, name: str, t: torch.Tensor) -> None:
        self.add(name, t.detach().float().contiguous().numpy(), "F32")


def _file_type(types: Counter) -> int:
    """general.file_type: what most quantized tensors are (llama.cpp's LlamaFileType)."""
    import gguf

    quant = {k: v for k, v in types.items() if k in ("Q4_1", "Q8_0")}
    if not quant:
        return int(gguf.LlamaFileType.ALL_F32)
    top = max(quant, key=quant.get)
    return int(gguf.LlamaFileType.MOSTLY_Q4_1 if top == "Q4_1" else gguf.LlamaFileType.MOSTLY_Q8_0)


def _add_metadata(writer: Any, hp: dict[str, Any], blocks: int, model: nn.Module) -> None:
    import gguf

    writer.add_name(str(getattr(model.config, "_name_or_path", "") or "optpass model").rstrip("/").split("/")[-1])
    writer.add_context_length(hp["context"])
    writer.add_embedding_length(hp["hidden"])
    writer.add_feed_forward_length(hp["ffn"])
    writer.add_block_count(blocks)
    writer.add_head_count(hp["heads"])
    writer.add_head_count_kv(hp["kv_heads"])
    writer.add_rope_freq_base(hp["rope_theta"])
    if hp["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(hp["rope_factor"]))
    writer.add_layer_norm_rms_eps(hp["eps"])
    writer.add_key_length(hp["head_dim"])
    writer.add_value_length(hp["head_dim"])
    writer.add_vocab_size(hp["vocab"])
    writer.add_rope_dimension_count(hp["head_dim"])


def _write_tensors(model: nn.Module, hp: dict[str, Any], out: _Tensors, name_map: Any) -> set[str]:
    """Every tensor llama.cpp's llama reads; returns the state-dict prefixes written (to find leftovers)."""
    inner = model.model
    written = {"model.embed_tokens.", "model.norm.", "lm_head."}
    embed = inner.embed_tokens.weight.detach()
    raw, kind = lossless_float(embed, out.smallest)
    out.add("token_embd.weight", raw, kind)
    for j, (i, block) in enumerate(kept_blocks(model)):
        hf = f"model.layers.{j}."
        gguf_name = (lambda suffix: name_map.get_name(hf + suffix, try_suffixes=(".weight",)))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out.vector(gguf_name(f"{norm}.weight"), getattr(block, norm).weight)
            written.add(f"model.layers.{i}.{norm}.")
        for part, names in (("self_attn", ATTENTION), ("mlp", MLP)):
            for proj in names:
                lw = linear_weights(f"model.layers.{i}.{part}.{proj}", getattr(getattr(block, part), proj))
                if proj in ("q_proj", "k_proj"):
                    heads = hp["heads"] if proj == "q_proj" else hp["kv_heads"]
                    lw = lw.permute_rows(rope_row_order(lw.out_features, heads))
                out.linear(gguf_name(f"{part}.{proj}.weight"), lw)
                written.add(f"model.layers.{i}.{part}.{proj}.")
    out.vector("output_norm.weight", inner.norm.weight)
    head = model.lm_head
    tied = type(head) is nn.Linear and head.weight.data_ptr() == embed.data_ptr()
    if not tied:  # llama.cpp reuses token_embd when output.weight is absent
        out.linear("output.weight", linear_weights("lm_head", head))
    return written


def write_gguf(model: nn.Module, path: Path, tokenizer: Any = None, float_matrices: str = "smallest") -> Path:
    """Write `model` to `path` (a .gguf file); see the module docstring for what is kept and how exactly.
    `float_matrices`: "smallest" (lossless Q8_0 / F16 / F32) or "F32" (e.g. to check the architecture mapping:
    an fp32 model in F32 with an F32 KV cache gives HF's logits to 1e-4 in llama.cpp)."""
    if float_matrices not in ("smallest", "F32"):
        raise ExportError(f"gguf export: float_matrices={float_matrices!r}; choose 'smallest' or 'F32'")
    import gguf

    from optpass.adapters import tokenizer_for
    from optpass.export import check_destination

    path = Path(path)
    check_destination("gguf", path)
    hp = check_llama(model)
    blocks = len(kept_blocks(model))
    state = export_state(model, "gguf", "llama.cpp", {})  # raises before anything is written
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        _add_metadata(writer, hp, blocks, model)
        tensors = _Tensors(writer, float_matrices == "smallest")
        with torch.no_grad():
            written = _write_tensors(model, hp, tensors, gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, blocks))
        leftover = [k for k in model.state_dict() if not any(k.startswith(p) for p in written)]
        if leftover:
            raise ExportError(f"gguf export: tensors with no GGUF counterpart: {leftover[:5]}")
        writer.add_file_type(_file_type(tensors.types))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, tokenizer if tokenizer is not None else tokenizer_for(model), hp["vocab"])
        state["export"].update(tensor_types=dict(tensors.types), weight_error=error_summary(tensors.errors))
        writer.add_string(STATE_KEY, json.dumps(state, default=str))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        path.unlink(missing_ok=True)
        raise
    writer.close()
    return path


def read_state(path: str | Path) -> dict[str, Any]:
    """The `optpass.state` record of a GGUF written by `write_gguf`."""
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get(STATE_KEY)
    if field is None:
        raise ExportError(f"{path}: no {STATE_KEY} key (not written by optpass)")
    return json.loads(field.contents())
