"""What a command line names, checked before any model loads (loading SmolLM2 takes 15-20 s; a typo in
`--target` should not cost that). Each check raises the error the library itself would raise later."""

from __future__ import annotations

from pathlib import Path


def check_model_spec(spec: str) -> None:
    """A built-in name or an existing path (what it holds is checked when it loads)."""
    from optpass.models import BUILTIN_MODELS
    from optpass.sources import unknown_model

    if spec not in BUILTIN_MODELS and not Path(spec).exists():
        raise unknown_model(spec)


def check_names(target: str | None = None, passes: list[str] | str | None = None, budget: str | None = None) -> None:
    from optpass.cost_models.hardware import get_spec
    from optpass.quality import QualityBudget
    from optpass.registry import get_pass

    if target is not None:
        get_spec(target)
    if passes not in (None, "auto"):
        for name in passes:
            get_pass(name)
    if budget:
        QualityBudget.parse(budget)


def check_export(fmt: str, output: str | None, onnx: bool = False, streaming: bool = False) -> None:
    """--format: a known name, with an -o that fits it (gguf: a .gguf file); other formats than optpass's need
    the model in memory (not ONNX input, not the block-by-block path)."""
    from optpass.errors import ConfigError
    from optpass.export import check_destination, check_format

    check_format(fmt)
    if fmt == "optpass":
        return
    if output is None:
        raise ConfigError(f"--format {fmt}: give the output path with -o")
    if onnx:
        raise ConfigError(f"--format {fmt}: ONNX input is written back as ONNX; --format applies to PyTorch models")
    if streaming:
        raise ConfigError(f"--format {fmt}: the block-by-block path writes optpass checkpoints; export one afterwards "
                          f"with optpass.save(optpass.load(DIR), PATH, format={fmt!r})")
    check_destination(fmt, output)
