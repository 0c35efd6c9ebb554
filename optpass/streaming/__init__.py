"""Models larger than memory: a Llama checkpoint directory quantized block by block (`quantize.py`).

Entry points: `optpass.optimize("hf_dir", passes=["quantize"], streaming=True, output="out")` and
`optpass optimize hf_dir --passes quantize --streaming -o out`. With `streaming=None` (the default) a
checkpoint directory takes this path by itself when its fp32 weights, held twice by the in-memory pass
manager, exceed the memory available (`memory.too_big_for_memory`); a warning and the report's first
note say so. Either way the result is a `StreamingResult` (`.path`, `.report`, `.load()`), not a module:
the whole model is never built.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from optpass.errors import ConfigError, UnsupportedModelError
from optpass.streaming.memory import available_memory, too_big_for_memory
from optpass.streaming.quantize import StreamingResult, quantize_streaming

__all__ = ["StreamingResult", "available_memory", "quantize_only", "quantize_streaming", "route", "wants_streaming"]


def quantize_only(passes: Any) -> Any:
    """The QuantizeConfig when `passes` is the quantize pass alone (name, config or pass object), else None."""
    from optpass.pass_base import Pass
    from optpass.passes.quantize import QuantizeConfig

    items = [p.strip() for p in passes.split(",") if p.strip()] if isinstance(passes, str) else list(passes or [])
    if len(items) != 1:
        return None
    item = items[0]
    if item == "quantize":
        return QuantizeConfig()
    if isinstance(item, QuantizeConfig):
        return item
    if isinstance(item, Pass) and item.name == "quantize":
        return item.config
    return None


def _hf_dir(model: Any) -> Path | None:
    from optpass.checkpoint import STATE_FILE

    if not isinstance(model, (str, Path)):
        return None
    path = Path(model)
    return path if path.is_dir() and (path / "config.json").exists() and not (path / STATE_FILE).exists() else None


def wants_streaming(model: Any, streaming: bool | None, passes: Any) -> tuple[bool, str]:
    """(stream?, why) for `optimize(model, passes=..., streaming=...)`; raises where neither path can run."""
    if streaming is False:
        return False, ""
    path = _hf_dir(model)
    if path is None:
        if streaming:
            raise ConfigError(f"streaming=True needs a Hugging Face checkpoint directory (config.json + safetensors); "
                              f"got {model!r}")
        return False, ""
    if streaming is None:
        from optpass.streaming.shards import ShardReader

        try:
            fp32 = ShardReader(path).fp32_bytes()
        except UnsupportedModelError:
            return False, ""  # not safetensors: only the in-memory loader reads it
        big, why = too_big_for_memory(fp32)
        if not big:
            return False, ""
    else:
        why = "streaming=True"
    if quantize_only(passes) is None:
        raise ConfigError(f"{path}: {why}; only the quantize pass runs block by block (passes=['quantize']), got "
                          f"passes={passes!r}; pass streaming=False to try the whole model in memory anyway")
    return True, why


def route(model: Any, streaming: bool | None, passes: Any, output: Any = None, **kwargs: Any) -> StreamingResult | None:
    """Run `model` block by block if `wants_streaming` says so (returns the result), else None."""
    stream, why = wants_streaming(model, streaming, passes)
    if not stream:
        return None
    if streaming is None:
        warnings.warn(f"optpass: {why}: quantizing block by block; optimize() returns a StreamingResult "
                      "(.path, .report), not a module", stacklevel=3)
    result = quantize_streaming(model, output, quantize_only(passes), **kwargs)
    if streaming is None:
        result.report.notes.insert(0, f"streamed automatically: {why}")
    return result
