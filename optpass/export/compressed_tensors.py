"""`optpass.save(model, dir, format="compressed-tensors")`: a Hugging Face model directory whose `config.json`
carries a compressed-tensors `quantization_config` (quant_method "compressed-tensors", format
"pack-quantized") describing optpass's choice, for stock transformers (`pip install compressed-tensors`,
no optpass import) and vLLM.

vLLM serves it through its compressed-tensors loader as W4A16 (4-bit int, group, asymmetric) and / or W8A16
(8-bit int, symmetric, channel or group), both its CompressedTensorsWNA16 scheme; float linears (a head kept
in float) are listed in `ignore`; blocks removed by layer skipping are left out and the others renumbered.
optpass int8 layers are written exactly. optpass int4 keeps a float zero point, compressed-tensors an integer
one, so int4 layers are re-encoded (`ct_layers`) as a candidate checked against the quality budget like any
other: `int4="auto"` (default) writes W4A16 when the integer-zero weights stay within the budget `optimize()`
used, else W8A16 (near exact, twice int4's bytes); "w4a16" / "w8a16" force one. "float-zero" writes optpass's
int4 exactly (float zero points, block strategy): stock transformers loads it, vLLM does not serve it, so
"auto" never picks it. The candidates' scores go to `optpass_state.json` (`export.int4`), with the decisions
vLLM / transformers have no equivalent for (KV-cache policy, skip sets, sparse / linear attention,
speculative decoding, DiT schedules, the runtime).

Known limit (transformers 5.24-5.25, compressed-tensors 0.20.1): transformers cannot load an asymmetric
pack-quantized checkpoint with integer zero points: on the meta device the package leaves zero points
unpacked, [N, G] int8, while the saved ones are packed [N / 8, G] int32 (the package's own save / load round
trip fails the same way), so a W4A16 export loads in vLLM but not in transformers; W8A16 (symmetric) loads in
both, "float-zero" (zero points not packed) in transformers only.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from optpass.backends.cpu.head_embedding import shared_tables
from optpass.backends.cpu.quant_linear import Int4Linear, QuantizedLinear
from optpass.errors import ExportError
from optpass.export.common import error_summary, export_state, kept_blocks, linear_weights, renumber, write_state
from optpass.export.ct_layers import INT4_ENCODINGS, VLLM_INT4_ENCODINGS, compress_layer, engine_layer, scheme_key

WEIGHTS_FILE = "model.safetensors"
VLLM_SCHEMES = {"w4a16": "W4A16 (CompressedTensorsWNA16: 4-bit int, group, asymmetric zero points)",
                "w8a16": "W8A16 (CompressedTensorsWNA16: 8-bit int, symmetric, channel or group)",
                "float-zero": "none: vLLM's compressed-tensors loader has no scheme for 4-bit int, block strategy, "
                              "float zero points (transformers loads it)"}


def choose_int4(model: nn.Module, int4: str, tokenizer: Any) -> tuple[str, dict[str, Any]]:
    """The int4 encoding to write and the record of how it was chosen ("auto": W4A16 if within budget)."""
    from optpass.export.candidates import CandidateCheck

    if int4 not in ("auto", *INT4_ENCODINGS):
        raise ExportError(f"compressed-tensors export: int4={int4!r}; choose auto, {', '.join(INT4_ENCODINGS)}")
    if not any(isinstance(m, Int4Linear) for m in model.modules()):
        return "w4a16", {}
    if int4 != "auto":
        return int4, {"chosen": int4, "how": "requested"}
    check = CandidateCheck(model, tokenizer)
    scores = {}
    for encoding in VLLM_INT4_ENCODINGS:  # smallest first; the last is kept even over budget (closest vLLM serves)
        scores[encoding] = check.score(lambda lw, enc=encoding: engine_layer(lw, enc).dequantized())
        if not scores[encoding]["violations"]:
            break
    if scores[encoding]["violations"]:
        warnings.warn(f"compressed-tensors export: even {encoding} is over the quality budget: "
                      f"{'; '.join(scores[encoding]['violations'])}", stacklevel=3)
    return encoding, {"chosen": encoding, "how": f"quality budget {check.budget.to_dict()} on {check.data}",
                      "candidates": scores}


def _vllm_name(weights: Any) -> str:
    """The `VLLM_SCHEMES` key of one layer's weight arguments."""
    if weights.num_bits == 8:
        return "w8a16"
    return "float-zero" if weights.strategy == "block" else "w4a16"


def _targets(names: list[str], all_linears: dict[str, str]) -> list[str]:
    """Compact targets for `names`: one `re:` pattern per layer position (block index generalised) where it
    matches only layers of this group among `all_linears` (path -> scheme key or "float"), else the names."""
    key = all_linears[names[0]]
    out: list[str] = []
    for name in names:
        pattern = "^" + re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(name)) + "$"
        hits = [p for p in all_linears if re.match(pattern, p)]
        target = "re:" + pattern if all(all_linears[p] == key for p in hits) else name
        if target not in out:
            out.append(target)
    return out


def config_groups(schemes: dict[str, Any], floats: list[str]) -> dict[str, Any]:
    """Layers grouped by scheme: targets ["Linear"] when one scheme covers every quantized layer, else each
    group's own targets."""
    by_key: dict[str, list[str]] = {}
    for name, scheme in schemes.items():
        by_key.setdefault(scheme_key(scheme), []).append(name)
    all_linears = {n: scheme_key(s) for n, s in schemes.items()} | {n: "float" for n in floats}
    groups = {}
    for i, names in enumerate(by_key.values()):
        scheme = schemes[names[0]].model_copy()
        scheme.targets = ["Linear"] if len(by_key) == 1 else _targets(names, all_linears)
        groups[f"group_{i}"] = scheme
    return groups


def _patch_config(directory: Path, index_map: dict[int, int], total: int) -> None:
    """config.json for the blocks that remain (layer skipping): count and per-layer lists."""
    if len(index_map) == total:
        return
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config["num_hidden_layers"] = len(index_map)
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = [t for i, t in enumerate(config["layer_types"]) if i in index_map]
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _blocks(model: nn.Module) -> tuple[dict[int, int], int]:
    """(original block index -> exported index, original block count); empty for models without blocks."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        return {}, 0
    return {i: j for j, (i, _) in enumerate(kept_blocks(model))}, len(layers)


def _tensors(model: nn.Module, int4: str, index_map: dict[int, int]) -> tuple[dict[str, torch.Tensor], dict, list]:
    """Every tensor to write (quantized layers compressed by the package, the rest as they are), the scheme
    of each quantized layer, and (name, served weight, optpass weight, step) for the error summary."""
    dtype = next(model.parameters()).dtype
    quantized = {p: m for p, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    tensors: dict[str, torch.Tensor] = {}
    schemes, errors = {}, []
    for path, module in quantized.items():
        lw = linear_weights(path, module)
        name = renumber(path, index_map)
        packed, served, schemes[name] = compress_layer(engine_layer(lw, int4), dtype)
        tensors.update({f"{name}.{k}": v for k, v in packed.items()})
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias.detach().clone()
        errors.append((name, served, lw.dequantized(), lw.scale if lw.scale.dim() == 2 else lw.scale[:, None]))
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for key, t in model.state_dict().items():
        if any(key.startswith(p + ".") for p in quantized) or (tied and key == "lm_head.weight"):
            continue
        tensors[renumber(key, index_map)] = t.detach().contiguous().clone()
    tensors.update({renumber(k, index_map): t for k, t in shared_tables(model).items()})  # embeddings read the head
    return tensors, schemes, errors


def write_compressed_tensors(model: nn.Module, directory: Path, tokenizer: Any = None, int4: str = "auto") -> Path:
    """Write `model` as a compressed-tensors Hugging Face directory (see the module docstring)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import save_file

    from optpass.checkpoint import _base_record, _write_hf_files
    from optpass.export import check_destination

    check_destination("compressed-tensors", directory)
    if _base_record(model)["library"] != "transformers":
        raise ExportError(f"compressed-tensors export: {type(model).__name__} is not a transformers model")
    if not any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ExportError("compressed-tensors export: no quantized linear layers (optimize with the quantize pass "
                          "first, or write format='optpass')")
    state = export_state(model, "compressed-tensors", "vLLM / transformers", {})
    index_map, total = _blocks(model)
    encoding, int4_record = choose_int4(model, int4, tokenizer)
    with torch.no_grad():
        tensors, schemes, errors = _tensors(model, encoding, index_map)
    floats = [renumber(p, index_map) for p, m in model.named_modules() if type(m) is nn.Linear]
    config = QuantizationConfig(config_groups=config_groups(schemes, floats), format="pack-quantized",
                                quantization_status="compressed", ignore=floats)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    _write_hf_files(model, out, tokenizer)
    _patch_config(out, index_map, total)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    ModelCompressor(quantization_config=config).update_config(str(out))
    served_as = sorted({_vllm_name(s.weights) for s in schemes.values()})
    state["export"].update(vllm_schemes=[VLLM_SCHEMES[k] for k in served_as], int4=int4_record, ignored=floats,
                           blocks_removed=sorted(set(range(total)) - set(index_map)),
                           weight_error=error_summary(errors))
    write_state(out, state)
    return out
