"""Models larger than memory: block-by-block int4 quantization of a synthetic ~1.5B Llama vs loading it whole.

Writes once a random-weight Llama checkpoint (hidden 2048, 26 layers, ffn 5632, MHA 32 heads, vocab 32000,
untied: 1.47B parameters, ~5.9 GB of fp32 safetensors in 4 shards) to `<optpass cache>/synthetic-llama-1.5b`
(not the repo), then measures in SEPARATE subprocesses, each reporting its own peak RSS (VmHWM, the whole
process, imports included) and wall time:
  stream     optpass block-by-block int4 g32 (+ AWQ) with an int8 head  -> an optpass checkpoint
  load_hf    transformers `from_pretrained(dtype=float32)` + one forward (the shards are mmapped: a forward
             touches every weight, so the RSS is what holding the model costs)
  in_memory  load_hf + `optpass.optimize(passes=[same config])` in memory, when free memory allows it
  load_ckpt  `optpass.load` of the streamed artifact + one forward (load builds the fp32 architecture first)
Results: `benchmarks/results/streaming_quantize.json` (target: stream peak RSS <= 0.4 x fp32 size).

    python benchmarks/streaming_quantize.py [--no-awq] [--skip in_memory] [--delete-after]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
CONFIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=26, num_attention_heads=32,
              num_key_value_heads=32, max_position_embeddings=2048, tie_word_embeddings=False)
SHARDS = 4
TARGET_RATIO = 0.4


def synthetic_dir() -> Path:
    from optpass.models import cache_dir

    return cache_dir() / "synthetic-llama-1.5b"


def write_synthetic(path: Path) -> None:
    """Random N(0, 0.02) weights (norms 1), written tensor by tensor with optpass's incremental writer (the
    writer never holds a shard): `model-0000i-of-00004.safetensors` + the index json, then config.json."""
    import torch
    from transformers import LlamaConfig

    from optpass.streaming.llama import skeleton
    from optpass.streaming.writer import SafetensorsWriter, TensorSpec

    config = LlamaConfig(**CONFIG)
    names = [(n, tuple(t.shape)) for n, t in skeleton(config).state_dict().items()]
    path.mkdir(parents=True, exist_ok=True)
    total = sum(_numel(s) for _, s in names)
    per_shard, bounds, acc, start = total / SHARDS, [], 0, 0
    for i, (_, shape) in enumerate(names):
        acc += _numel(shape)
        if acc >= per_shard * (len(bounds) + 1) and len(bounds) < SHARDS - 1:
            bounds.append((start, i + 1))
            start = i + 1
    bounds.append((start, len(names)))
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for k, (a, b) in enumerate(bounds):
        file = f"model-{k + 1:05d}-of-{len(bounds):05d}.safetensors"
        writer = SafetensorsWriter(path / file, [TensorSpec(n, torch.float32, s) for n, s in names[a:b]],
                                   metadata={"format": "pt"})
        for name, shape in names[a:b]:
            t = torch.ones(shape) if "norm" in name else torch.randn(shape, generator=g).mul_(0.02)
            writer.write(name, t)
            weight_map[name] = file
        writer.close()
        print(f"wrote {file}", flush=True)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total * 4},
                                                                   "weight_map": weight_map}))
    config.save_pretrained(path)  # last: its presence marks a complete checkpoint


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def _quantize_config(awq: bool) -> Any:
    from optpass.passes.quantize import QuantizeConfig

    return QuantizeConfig(weights="int4", lm_head="int8", group_size=32, awq=awq)


def child(mode: str, src: Path, out: Path, awq: bool) -> dict[str, Any]:
    """One measurement in this (fresh) process; wall time of the operation, peak RSS of the process."""
    import torch

    import optpass

    base = _status("VmRSS:")
    ids = torch.randint(0, CONFIG["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if mode == "stream":
        from optpass.streaming import quantize_streaming

        result = quantize_streaming(src, out, _quantize_config(awq), check_load=False, quality_budget="ppl:100%,kl:10")
        rep = result.report
        extra = {"quality_block_by_block": rep.quality_final, "reference": rep.quality_reference,
                 "artifact_bytes": sum(f.stat().st_size for f in out.iterdir()), "notes": rep.notes,
                 "awq_mean_alpha": rep.passes[0].details.get("awq", {}).get("mean_alpha")}
    elif mode in ("load_hf", "in_memory"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
        with torch.no_grad():
            model(input_ids=ids)
        extra["load_s"] = time.perf_counter() - t0
        if mode == "in_memory":
            opt = optpass.optimize(model, passes=[_quantize_config(awq)], quality_budget="ppl:100%,kl:10")
            extra["applied"] = opt.optpass_report.applied
            extra["quality"] = opt.optpass_report.passes[0].quality
    elif mode == "load_ckpt":
        model = optpass.load(out)
        with torch.no_grad():
            model(input_ids=ids)
    else:
        raise SystemExit(f"unknown mode {mode}")
    return {"mode": mode, "wall_s": time.perf_counter() - t0, "peak_rss_bytes": _status("VmHWM:"),
            "rss_after_imports_bytes": base, **extra}


def run_child(mode: str, src: Path, out: Path, awq: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", mode, "--src", str(src), "--out", str(out)] + ([] if awq else ["--no-awq"])
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OPTPASS_PROGRESS": "0"})
    if proc.returncode != 0:
        return {"mode": mode, "error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    got["process_s"] = time.perf_counter() - started
    return got


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--src", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="where the streamed checkpoint goes (default: beside the source)")
    ap.add_argument("--no-awq", action="store_true", help="plain int4 g32 (no activation-aware scales)")
    ap.add_argument("--skip", action="append", default=[], help="a mode to leave out (repeatable)")
    ap.add_argument("--delete-after", action="store_true", help="delete the synthetic checkpoint and the artifact")
    args = ap.parse_args()
    awq = not args.no_awq
    if args.child:
        print(json.dumps(child(args.child, Path(args.src), Path(args.out), awq), default=str))
        return

    from optpass.streaming.shards import ShardReader

    src = synthetic_dir()
    out = Path(args.out) if args.out else src.with_name(src.name + "-optpass-int4")
    if not (src / "config.json").exists():
        free = shutil.disk_usage(src.parent if src.parent.exists() else Path.home()).free
        if free < 9e9:
            raise SystemExit(f"need ~6 GB for the synthetic checkpoint and ~1.5 GB for the artifact; {free / 1e9:.1f} GB free")
        t0 = time.perf_counter()
        write_synthetic(src)
        print(f"synthetic checkpoint written in {time.perf_counter() - t0:.0f}s", flush=True)
    reader = ShardReader(src)
    fp32 = reader.fp32_bytes()
    params = fp32 // 4
    results: dict[str, Any] = {
        "model": {"config": CONFIG, "parameters": params, "fp32_bytes": fp32, "shards": SHARDS, "path": str(src)},
        "quantization": {"blocks": "int4 g32", "lm_head": "int8 per channel", "awq": awq},
        "machine": {"cores": os.cpu_count(), "mem_total_bytes": _meminfo("MemTotal:"),
                    "load_average_at_start": os.getloadavg()},
        "runs": {},
    }
    for mode in ("stream", "load_ckpt", "load_hf", "in_memory"):
        if mode in args.skip:
            continue
        if mode == "in_memory" and _meminfo("MemAvailable:") < 2.5 * fp32 + 2e9:
            results["runs"][mode] = {"skipped": f"MemAvailable {_meminfo('MemAvailable:') / 2**30:.1f} GiB < "
                                                f"2.5 x fp32 + 2 GB (model + the pass manager's working copy)"}
            continue
        print(f"running {mode} ...", flush=True)
        got = run_child(mode, src, out, awq)
        if "peak_rss_bytes" in got:
            got["peak_rss_over_fp32"] = got["peak_rss_bytes"] / fp32
        results["runs"][mode] = got
        print(json.dumps({k: v for k, v in got.items() if k != "notes"}, default=str)[:600], flush=True)
    stream = results["runs"].get("stream", {})
    if "peak_rss_bytes" in stream:
        results["target"] = {"stream_peak_rss_over_fp32": stream["peak_rss_over_fp32"], "max": TARGET_RATIO,
                             "met": stream["peak_rss_over_fp32"] <= TARGET_RATIO}
    results["command"] = "python " + " ".join(sys.argv)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "streaming_quantize.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {RESULTS / 'streaming_quantize.json'}")
    if args.delete_after:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
