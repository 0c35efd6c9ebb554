"""`optpass run OUT --prompt "..."`: generate from an optimized LLM checkpoint, so a user sees it work."""

from __future__ import annotations

import argparse
import sys
import time

from optpass.cli import command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="directory written by `optpass optimize ... -o OUT` (or optpass.save)")
    p.add_argument("--prompt", default=None, help="text to continue (greedy decoding); required for LLMs")
    p.add_argument("--image", default=None,
                   help="DiT checkpoints: where to write the sampled grid (PNG; default: samples.png in the checkpoint)")
    p.add_argument("--steps", type=int, default=None, help="DiT checkpoints: DDIM steps (default 50)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="LLM checkpoints: tokens to generate (default 32)")
    p.add_argument("--no-compile", action="store_true",
                   help="decode eagerly with Hugging Face's generate() instead of the compiled static decoder")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


# checkpoint library -> (what it holds, the options that apply to it)
KIND_OPTIONS = {"transformers": ("language model", {"prompt", "max_new_tokens"}),
                "diffusers": ("diffusion transformer", {"image", "steps"})}
ALL_KIND_OPTIONS = set().union(*(opts for _, opts in KIND_OPTIONS.values()))


@command("run", help="generate text from an optimized LLM checkpoint", add_arguments=add_arguments)
def run(args: argparse.Namespace) -> int:
    import torch

    from optpass.checkpoint import load, read_state
    from optpass.errors import UnsupportedModelError

    state = read_state(args.checkpoint)
    library = state["base"].get("library")
    if library not in KIND_OPTIONS:
        raise UnsupportedModelError(f"{args.checkpoint}: `optpass run` generates from causal LM or DiT checkpoints; "
                                    f"this one holds a {library} {state['base'].get('class')}")
    kind, allowed = KIND_OPTIONS[library]
    wrong = [f"--{name.replace('_', '-')}" for name in ALL_KIND_OPTIONS - allowed if getattr(args, name) is not None]
    if wrong:
        raise ValueError(f"{args.checkpoint} holds a {kind}: {', '.join(sorted(wrong))} do(es) not apply to it "
                         f"(options for a {kind}: {', '.join(sorted('--' + a.replace('_', '-') for a in allowed))})")
    if args.threads:
        torch.set_num_threads(args.threads)
    if library == "diffusers":
        return _sample_dit(args, load(args.checkpoint))
    if args.prompt is None:
        raise ValueError(f"{args.checkpoint} holds a language model: give --prompt")
    args.max_new_tokens = 32 if args.max_new_tokens is None else args.max_new_tokens
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    from transformers import AutoTokenizer

    model = load(args.checkpoint)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.checkpoint, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise UnsupportedModelError(f"{args.checkpoint}: no tokenizer saved alongside the checkpoint ({e})") from e
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    generate = type(model).generate.__get__(model) if args.no_compile else model.generate
    start = time.perf_counter()
    with torch.inference_mode():
        out = generate(input_ids=ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    print(args.prompt + tokenizer.decode(new, skip_special_tokens=True))
    applied = ", ".join(p["name"] for p in state.get("passes", [])) or "none"
    runtime = getattr(model, "optpass_runtime", None)
    compiled = runtime is not None and runtime.engine is not None and runtime.fast_calls > 0
    how = "compiled decode, incl. compilation" if compiled and not args.no_compile else "eager"
    print(f"[optpass run] {new.numel()} tokens in {seconds:.2f}s ({how}; passes: {applied})", file=sys.stderr)
    return 0


def _sample_dit(args: argparse.Namespace, model: object) -> int:
    """One DDIM sample per class label (0..9, or fewer classes), seeds 0..n-1, written as one PNG row."""
    from optpass.sampling import ddim_sample, save_grid

    from pathlib import Path

    image = args.image or str(Path(args.checkpoint) / "samples.png")
    steps = args.steps if args.steps is not None else 50
    if steps < 1:
        raise ValueError(f"--steps {steps}: must be >= 1")
    classes = int(getattr(model.config, "num_embeds_ada_norm", 0) or 0)
    n = min(classes, 10) if classes else 8
    start = time.perf_counter()
    images = ddim_sample(model, seeds=list(range(n)), labels=list(range(n)) if classes else None, steps=steps)
    save_grid({"optpass": images}, image)
    print(f"wrote {image}: {n} samples, {steps} DDIM steps in {time.perf_counter() - start:.1f}s")
    return 0
