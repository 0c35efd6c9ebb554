"""`optpass optimize MODEL --target T [-o OUT [--format F]]`: optimize, print the report, optionally write a
checkpoint (or a GGUF / compressed-tensors export)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from optpass.cli import command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="built-in name (smollm2, gemma3-270m, all-minilm-l6-v2, tiny-dit), a Hugging Face model directory, a .gguf file "
                                 "or an .onnx file")
    p.add_argument("--target", default="cpu", help="cpu, cuda, h100, h200, a100, l4, rtx4090, m2, cpu-desktop")
    p.add_argument("--passes", default="auto", help="'auto' or a comma-separated list of pass names")
    p.add_argument("--quality-budget", default=None, help="e.g. 'ppl:2%%' or 'kl:0.05,top1:0.9'")
    p.add_argument("--objective", default="latency", choices=["latency", "memory"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--report-json", default=None, help="also write the report as JSON to this file")
    p.add_argument("-o", "--output", default=None, help="write the optimized checkpoint to this directory "
                                                        "(an .onnx path for ONNX input)")
    p.add_argument("--format", default="optpass", metavar="{optpass,gguf,compressed-tensors}",
                   help="what -o writes: optpass's checkpoint (default), a .gguf file for llama.cpp, or a "
                        "compressed-tensors Hugging Face directory for transformers / vLLM")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="text file used as calibration / quality data (tokenized with the model's tokenizer)")
    p.add_argument("--streaming", action="store_true",
                   help="quantize a Hugging Face Llama directory block by block, never holding the fp32 model "
                        "(--passes quantize; default output <dir>-optpass). Without it, used when the model does "
                        "not fit in memory")


@command("optimize", help="optimize a model for a target and print the report", add_arguments=add_arguments)
def run(args: argparse.Namespace) -> int:
    import torch

    import optpass
    from optpass.cli.sources import calibration_tokens, optimize_onnx_file
    from optpass.cli.validate import check_export, check_model_spec, check_names
    from optpass.export import preflight
    from optpass.sources import is_onnx, load_model_source

    passes = args.passes.split(",") if args.passes and args.passes != "auto" else "auto"
    check_names(args.target, passes, args.quality_budget)
    check_model_spec(args.model)
    check_export(args.format, args.output, onnx=is_onnx(args.model))
    if args.threads:
        torch.set_num_threads(args.threads)
    from optpass.streaming import wants_streaming

    if is_onnx(args.model) and not args.streaming:
        report = optimize_onnx_file(args, passes)
    elif wants_streaming(args.model, True if args.streaming else None, passes)[0]:
        check_export(args.format, args.output, streaming=True)
        report = _streamed(args, passes)
    else:
        model, tokenizer = load_model_source(args.model)
        preflight(args.format, model)
        calibration = calibration_tokens(args.calibration, tokenizer) if args.calibration else None
        optimized = optpass.optimize(model, target=args.target, passes=passes, quality_budget=args.quality_budget,
                                     objective=args.objective, calibration_data=calibration)
        report = optimized.optpass_report
        if args.output:
            optpass.save(optimized, args.output, tokenizer=tokenizer, format=args.format)
    print(report)
    if args.output:
        print(f"wrote {args.output}")
    if args.report_json:
        with open(args.report_json, "w") as f:
            json.dump(report.to_dict() if hasattr(report, "to_dict") else report, f, indent=2, default=str)
    return 0


def _streamed(args: argparse.Namespace, passes: object) -> object:
    """Block-by-block quantization (`optpass/streaming/`): the model is never loaded whole."""
    import optpass
    from optpass.cli.sources import calibration_tokens
    from optpass.sources import _local_tokenizer

    calibration = calibration_tokens(args.calibration, _local_tokenizer(Path(args.model))) if args.calibration else None
    result = optpass.optimize(args.model, target=args.target, passes=passes, quality_budget=args.quality_budget,
                              calibration_data=calibration, streaming=True if args.streaming else None,
                              output=args.output)
    args.output = str(result.path)
    return result.report
