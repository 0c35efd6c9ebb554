"""Optimized checkpoints: `save(model, dir)` / `load(dir)` (`save(..., format="gguf" | "compressed-tensors")`
writes another engine's format instead, see `optpass.export`).

A checkpoint is a directory with
- `optpass_model.safetensors`: the model's state dict as stored (quantized linears as their canonical packed
  integers, scales and zero points, never a kernel layout; shared tensors once, the rest as aliases; no pickle);
- `optpass_state.json`: the base model (library, class, config), the applied passes in order with their
  versioned configs and `Pass.saved_state` records, the target, optpass / torch versions, and a sha256 per
  weight file;
- for Hugging Face models, `config.json` (+ generation config) and the tokenizer, so `AutoTokenizer` /
  `AutoConfig.from_pretrained(dir)` work on it. The weight file is deliberately not `model.safetensors`:
  plain `from_pretrained` would half-load quantized tensors into float modules.

`load` rebuilds the base model from its config (no download), runs each pass's `restore` in order (no
recalibration), then loads the weights strictly; every check happens before the model is returned, so a
failure never hands back a half-loaded model.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from optpass.errors import CheckpointError, ConfigError, UnknownPassError

FORMAT = "optpass-checkpoint"
FORMAT_VERSION = 1
STATE_FILE = "optpass_state.json"
WEIGHTS_FILE = "optpass_model.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- base models: one builder per library

def _base_record(model: nn.Module) -> dict[str, Any]:
    """How to rebuild the un-optimized architecture: library, class and its config (no weights)."""
    cls = type(model)
    config = getattr(model, "config", None)
    if cls.__module__.startswith("transformers") and hasattr(config, "to_dict"):
        return {"library": "transformers", "class": cls.__name__, "dtype": str(next(model.parameters()).dtype)}
    if cls.__module__.startswith("diffusers") and config is not None:
        return {"library": "diffusers", "class": cls.__name__, "config": dict(config),
                "dtype": str(next(model.parameters()).dtype)}
    raise CheckpointError(f"save: cannot record how to rebuild a {cls.__module__}.{cls.__name__}; checkpoints "
                          "support Hugging Face transformers and diffusers models")


def _build_base(base: dict[str, Any], directory: Path) -> nn.Module:
    library, name = base.get("library"), base.get("class")
    try:
        module = importlib.import_module(library)
        cls = getattr(module, name)
    except (ImportError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{directory / STATE_FILE}: base model {library}.{name} is not available here: {e}") from e
    dtype = getattr(torch, str(base.get("dtype", "torch.float32")).replace("torch.", ""))
    if library == "transformers":
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
        model = cls(config)
    else:
        config = {k: v for k, v in base["config"].items() if not k.startswith("_")}
        model = cls.from_config(config)
    return model.to(dtype).eval()


def _write_hf_files(model: nn.Module, directory: Path, tokenizer: Any) -> None:
    """config.json, generation_config.json and the tokenizer, so HF tools can read the directory."""
    model.config.save_pretrained(str(directory))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(directory))
    if tokenizer is None:
        from optpass.adapters import tokenizer_for

        tokenizer = tokenizer_for(model)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))


# ---------------------------------------------------------------- save

def _applied_steps(model: nn.Module) -> list[Any]:
    """Plan steps whose pass the report says was applied, in execution order."""
    plan = getattr(model, "optpass_plan", None)
    report = getattr(model, "optpass_report", None)
    if plan is None:
        return []
    applied = {p.name for p in report.passes if p.status == "applied"} if report is not None else set()
    return [step for step in plan.steps if step.name in applied]


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors sharing storage (tied embeddings) are written once; the others become aliases."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:
            aliases[key] = seen[ident]
        else:
            seen[ident] = key
            kept[key] = t.detach().contiguous().clone()
    return kept, aliases


def save(model: nn.Module, directory: str | Path, tokenizer: Any = None, format: str = "optpass",
         **options: Any) -> Path:
    """Write `model` (optimized by `optimize()` or plain); returns the path written. `format`: "optpass" (this
    module's checkpoint directory, what `load` reads), "gguf" (a .gguf file for llama.cpp) or
    "compressed-tensors" (a Hugging Face directory for transformers / vLLM); `options` go to that format's
    writer (e.g. int4="w8a16" for compressed-tensors); see `optpass.export`."""
    from optpass.export import get_exporter

    return get_exporter(format)(model, Path(directory), tokenizer, **options)


def state_record(model: nn.Module) -> dict[str, Any]:
    """What optpass decided, whatever format the weights go to: base model, applied passes (versioned configs
    and `Pass.saved_state` records), target, decode runtime, versions."""
    import optpass
    from optpass.pass_base import Pass

    base = _base_record(model)
    passes = []
    for step in _applied_steps(model):
        if type(step.pass_).restore is Pass.restore:
            raise CheckpointError(f"save: pass {step.name!r} changed the model but implements no restore(); its "
                                  "changes could not be rebuilt on load, so no checkpoint was written")
        passes.append({"name": step.name, "config": step.pass_.config.to_dict(),
                       "state": step.pass_.saved_state(model)})
    plan = getattr(model, "optpass_plan", None)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "optpass_version": optpass.__version__,
        "torch_version": torch.__version__,
        "target": plan.target if plan is not None else None,
        "base": base,
        "passes": passes,
        "runtime": _runtime_record(model),
    }


def write_checkpoint(model: nn.Module, directory: Path, tokenizer: Any = None) -> Path:
    """The "optpass" format: weights as stored, the state record, and the HF config / tokenizer."""
    from safetensors.torch import save_file

    out = Path(directory)
    state = state_record(model)
    tensors, aliases = _dedupe(model.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    if state["base"]["library"] == "transformers":
        _write_hf_files(model, out, tokenizer)
    weights = out / WEIGHTS_FILE
    save_file(tensors, str(weights), metadata={"format": FORMAT})
    state["weights"] = {WEIGHTS_FILE: {"sha256": _sha256(weights), "tensors": len(tensors)}}
    state["aliases"] = aliases
    (out / STATE_FILE).write_text(json.dumps(state, indent=2, default=str))
    return out


# ---------------------------------------------------------------- load

def read_state(directory: str | Path) -> dict[str, Any]:
    """Parse and version-check `optpass_state.json`."""
    path = Path(directory) / STATE_FILE
    if not path.exists():
        raise CheckpointError(f"{path}: not found; is {directory} an optpass checkpoint (written by optpass.save)?")
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if state.get("format") == "optpass-export":
        raise CheckpointError(f"{path}: an export for {state.get('export', {}).get('format')} (optpass.save(..., "
                              "format=...)), not an optpass checkpoint: load it with that format's engine")
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format is {state.get('format')!r}, expected {FORMAT!r}")
    version = state.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version} was written by a newer optpass "
                              f"({state.get('optpass_version')}); this optpass reads up to {FORMAT_VERSION}: upgrade optpass")
    return state


def _read_weights(directory: Path, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for name, info in state.get("weights", {}).items():
        path = directory / name
        if not path.exists():
            raise CheckpointError(f"{path}: weight file is missing")
        digest = _sha256(path)
        if digest != info.get("sha256"):
            raise CheckpointError(f"{path}: content hash mismatch (file is corrupted or was modified): "
                                  f"sha256 {digest[:12]}..., expected {str(info.get('sha256'))[:12]}...")
        try:
            tensors.update(load_file(str(path)))
        except Exception as e:  # noqa: BLE001 - any parse failure is a corrupted file
            raise CheckpointError(f"{path}: cannot parse safetensors: {e}") from e
    for alias, source in state.get("aliases", {}).items():
        if source not in tensors:
            raise CheckpointError(f"{directory / STATE_FILE}: alias {alias} -> {source}, but {source} is not stored")
        tensors[alias] = tensors[source]
    return tensors


def _runtime_record(model: nn.Module) -> dict[str, Any] | None:
    from optpass.backends.runtime import runtime_plan

    plan = runtime_plan(model)
    return plan.to_dict() if plan is not None else None


def _install_runtime(model: nn.Module, state: dict[str, Any], state_path: Path) -> None:
    """The decode runtime the checkpoint records (older checkpoints: derived from the passes' own records)."""
    from optpass.backends.runtime import DecodePlan, install_runtime

    record = state.get("runtime")
    try:
        plan = DecodePlan.from_dict(record) if record else _legacy_plan(state)
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"{state_path}: runtime record: {e}") from e
    install_runtime(model, plan)


def _legacy_plan(state: dict[str, Any]) -> Any:
    """Format-1 checkpoints kept fast decode in the quantize record and KV settings in the kv_cache record."""
    from optpass.backends.runtime import DecodePlan

    plan = DecodePlan()
    for record in state.get("passes", []):
        s = record.get("state", {})
        if record.get("name") == "quantize" and s.get("fast_decode"):
            plan = plan.merge("quantize", {"compiled_step": True, "max_cache_len": int(s.get("max_cache_len", 1024))})
        if record.get("name") == "kv_cache" and s.get("settings"):
            plan = plan.merge("kv_cache", {"kv": s["settings"]})
    return plan


def _restore_passes(model: nn.Module, state: dict[str, Any], state_path: Path) -> nn.Module:
    from optpass.registry import get_pass

    for record in state.get("passes", []):
        try:
            cls = get_pass(record["name"])
            config = cls.config_cls.from_dict(record.get("config", {}))
        except UnknownPassError as e:
            raise CheckpointError(f"{state_path}: pass {record['name']!r} is not available: {e}") from e
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"{state_path}: pass {record['name']!r} config: {e}") from e
        model = cls(config).restore(model, record.get("state", {}))
    return model


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], weights: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{weights}: tensors do not match the rebuilt model: missing {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                              f"{'...' if len(unexpected) > 5 else ''}")
    for key, ref in expected.items():
        got = tensors[key]
        if tuple(got.shape) != tuple(ref.shape):
            raise CheckpointError(f"{weights}: tensor {key} has shape {tuple(got.shape)}, the model expects {tuple(ref.shape)}")
        if got.dtype != ref.dtype:
            raise CheckpointError(f"{weights}: tensor {key} has dtype {got.dtype}, the model expects {ref.dtype}")


def load(directory: str | Path) -> nn.Module:
    """Rebuild the optimized model saved in `directory` (see the module docstring); returns it in eval mode.
    The state record is on `model.optpass_checkpoint`."""
    directory = Path(directory)
    state = read_state(directory)
    state_path = directory / STATE_FILE
    tensors = _read_weights(directory, state)  # hash + parse before building anything
    from optpass.registry import registered_passes

    unknown = [r.get("name") for r in state.get("passes", []) if r.get("name") not in registered_passes()]
    if unknown:
        raise CheckpointError(f"{state_path}: unknown pass(es) {unknown}; registered: {', '.join(sorted(registered_passes()))}")
    model = _build_base(state["base"], directory)
    model = _restore_passes(model, state, state_path)
    _check_tensors(model, tensors, directory / WEIGHTS_FILE)
    model.load_state_dict(tensors, strict=True)
    model.eval()
    _install_runtime(model, state, state_path)
    model.optpass_checkpoint = state
    return model
