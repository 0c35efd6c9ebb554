"""DiT block caching on the trained digit DiT: sampling time, block-steps computed, PSNR vs uncached.

For 50 and 20 DDIM steps, every optpass policy is calibrated on its own (budget: PSNR >= 30 dB on the final
images, 1 dB margin on calibration seeds, checked on held-out seeds), and diffusers' own hooks
(First-Block-Cache, TaylorSeer, MagCache) get the same search (`calibrate_peer`): chains of settings bisected on
the same calibration seeds with the same margin, the cheapest passing ones re-checked on the same held-out
seeds ("equal PSNR", equal effort). All arms then
sample the same benchmark seeds (disjoint from calibration) in interleaved rounds; a PNG grid shows them.
A random-weight larger DiT measures speed only (same policy settings, no quality claim).

    python benchmarks/dit_cache.py            # full (see README for the time it takes)
    python benchmarks/dit_cache.py --quick    # harness check: 20 steps, two policies, two rounds
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import RESULTS, Variant, run_scenario, write
from optpass.digit_dit import load_digit_dit
from optpass.passes.dit_caching import cache_controller, install_block_cache, make_policy
from optpass.passes.dit_caching.calibrate import INTERVALS, calibrate, most_aggressive_passing
from optpass.quality import QualityBudget
from optpass.sampling import ddim_sample, image_metrics, save_grid

CALIB, HOLDOUT = (0, 1, 2, 3), (100, 101, 102, 103, 104, 105)
POLICIES = ("fixed_interval", "first_block", "teacache", "taylorseer", "taylorseer_gated")
BUDGET = QualityBudget(min_psnr=30.0)
STACK = "transformer_blocks"
GUIDANCE = 2.0  # classifier-free guidance as DiTPipeline does it: every arm sees the doubled [cond; uncond] batch


def labels(seeds) -> list[int]:
    return [s % 10 for s in seeds]


class BlockCounter:
    """Counts block executions through each block's first attention (skipped blocks never reach it)."""

    def __init__(self, model: nn.Module) -> None:
        self.count = 0
        for blk in getattr(model, STACK):
            blk.attn1.register_forward_hook(self._hit)

    def _hit(self, *_: Any) -> None:
        self.count += 1


# ---- diffusers peers ------------------------------------------------------------------------------------
def peer_denoise(model: nn.Module) -> Callable:
    """A denoise fn that gives diffusers' hooks the cache context a pipeline would (name, step index)."""
    from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

    state = {"i": 0, "last": None}

    def denoise(m, x, t, y):
        t0 = float(t[0])
        if state["last"] is None or t0 >= state["last"]:
            HookRegistry.check_if_exists_or_initialize(m).reset_stateful_hooks(recurse=True)
            state["i"] = 0
        state["last"] = t0
        _set_cache_context(m, CacheContext("cond", step_index=state["i"]))
        try:
            return m(x, timestep=t, class_labels=y, return_dict=False)[0]
        finally:
            _set_cache_context(m, None)
            state["i"] += 1

    return denoise


def geometric(first: float, ratio: float, count: int) -> list[float]:
    return [round(first * ratio ** i, 4) for i in range(count)]


def peer_chains(steps: int) -> dict[str, list[list[tuple[str, Callable[[nn.Module], None]]]]]:
    """Each peer's settings as optpass's calibrator sees its own: chains of 8, least to most aggressive, one chain
    per discrete variant (TaylorSeer's order, as optpass's), intervals = optpass's INTERVALS, thresholds a
    geometric ladder over the range the hook's documentation uses."""
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig, apply_first_block_cache
    from diffusers.hooks.mag_cache import apply_mag_cache
    from diffusers.hooks.taylorseer_cache import apply_taylorseer_cache

    fbc = [(f"threshold={th}", lambda m, th=th: apply_first_block_cache(m, FirstBlockCacheConfig(threshold=th)))
           for th in geometric(0.01, 1.6, 8)]
    tsc = [[(f"interval={k} order={o}", lambda m, k=k, o=o: apply_taylorseer_cache(
        m, TaylorSeerCacheConfig(cache_interval=k, max_order=o, taylor_factors_dtype=torch.float32,
                                 cache_identifiers=[r"transformer_blocks\.\d+"])))
        for k in INTERVALS] for o in (1, 2)]
    mag = [(f"threshold={th}", lambda m, th=th: apply_mag_cache(m, MagCacheConfig(
        threshold=th, max_skip_steps=4, num_inference_steps=steps, mag_ratios=m._mag_ratios)))
        for th in geometric(0.02, 1.6, 8)]
    return {"diffusers FirstBlockCache": [fbc], "diffusers TaylorSeerCache": tsc, "diffusers MagCache": [mag]}


def mag_ratios(model: nn.Module, steps: int) -> torch.Tensor:
    """MagCache needs per-model magnitude ratios: its own calibration mode records them on one run (we read
    them from the hook state just before its last step resets it)."""
    from diffusers.hooks import MagCacheConfig
    from diffusers.hooks.mag_cache import apply_mag_cache

    m = copy.deepcopy(model)
    apply_mag_cache(m, MagCacheConfig(calibrate=True, num_inference_steps=steps + 1))  # +1: no reset at the end
    ddim_sample(m, CALIB[:1], labels(CALIB[:1]), steps, denoise=peer_denoise(m), guidance_scale=GUIDANCE)
    for mod in m.modules():
        registry = getattr(mod, "_diffusers_hook", None)
        for hook in (registry.hooks.values() if registry is not None else []):
            manager = getattr(hook, "state_manager", None)
            for state in (getattr(manager, "_state_cache", {}) or {}).values():
                ratios = getattr(state, "calibration_ratios", None)
                if ratios:
                    return torch.tensor(list(ratios)[:steps])
    raise RuntimeError("MagCache calibration recorded no ratios on this model")


def calibrate_peer(model: nn.Module, steps: int, chains) -> tuple[str, nn.Module, dict[str, Any]] | None:
    """The search optpass's own calibrator runs (`passes/dit_caching/calibrate.py`), on a peer's settings: each
    chain bisected on the calibration seeds with the same 1 dB margin, the passing settings tried cheapest
    first (measured block-steps) on the held-out seeds, up to 3, the first within budget kept."""
    reference = ddim_sample(model, CALIB, labels(CALIB), steps, guidance_scale=GUIDANCE)
    passing: list[tuple[float, float, str, Callable]] = []

    def score(setting: tuple[str, Callable]) -> bool:
        label, apply = setting
        m = copy.deepcopy(model)
        apply(m)
        counter = BlockCounter(m)
        out = ddim_sample(m, CALIB, labels(CALIB), steps, denoise=peer_denoise(m), guidance_scale=GUIDANCE)
        psnr = image_metrics(reference, out)["psnr"]
        ok = psnr >= BUDGET.min_psnr + 1.0 and bool(torch.isfinite(out).all())
        if ok:
            fraction = counter.count / (steps * len(getattr(m, STACK)))
            passing.append((fraction, -psnr, label, apply))
        return ok

    for chain in chains:
        most_aggressive_passing(chain, score)
    held_ref = ddim_sample(model, HOLDOUT, labels(HOLDOUT), steps, guidance_scale=GUIDANCE)
    tried: dict[str, float] = {}
    for fraction, _, label, apply in sorted(passing)[:3]:
        m = copy.deepcopy(model)
        apply(m)
        psnr = image_metrics(held_ref, ddim_sample(m, HOLDOUT, labels(HOLDOUT), steps, denoise=peer_denoise(m),
                                                   guidance_scale=GUIDANCE))["psnr"]
        if psnr >= BUDGET.min_psnr:
            return label, m, {"holdout_psnr": psnr, "calibration_fraction": fraction, "rejected_on_holdout": tried}
        tried[label] = psnr
    return None


# ---- variants ---------------------------------------------------------------------------------------------
def timed(model: nn.Module, seeds, steps: int, denoise=None) -> dict[str, float]:
    kwargs = {"denoise": denoise} if denoise else {}
    t0 = time.perf_counter()
    ddim_sample(model, seeds, labels(seeds), steps, guidance_scale=GUIDANCE, **kwargs)
    return {"sample_s": time.perf_counter() - t0}


def build_variants(base: nn.Module, steps: int, seeds, policies, peers: bool, images: dict) -> list[Variant]:
    ref = ddim_sample(base, seeds, labels(seeds), steps, guidance_scale=GUIDANCE)
    images["uncached"] = ref
    variants = [Variant(f"{steps} steps / uncached", lambda: base, lambda m: timed(m, seeds, steps),
                        lambda m: {"computed_fraction": 1.0, "psnr_db": float("inf")})]

    def quality(name: str, denoise=None):
        def q(m):
            counter = BlockCounter(m) if denoise else None
            out = ddim_sample(m, seeds, labels(seeds), steps, guidance_scale=GUIDANCE,
                              **({"denoise": denoise} if denoise else {}))
            images[name] = out
            frac = (counter.count / (steps * len(getattr(m, STACK))) if counter
                    else cache_controller(m).stats.computed_fraction)
            return {"computed_fraction": frac, "psnr_db": image_metrics(ref, out)["psnr"]}
        return q

    for name in policies:
        def setup(name=name):
            m = copy.deepcopy(base)
            res = calibrate(m, STACK, lambda mm, s: ddim_sample(mm, s, labels(s), steps, guidance_scale=GUIDANCE), BUDGET,
                                      CALIB, HOLDOUT, (name,))
            if res.chosen is None:
                raise RuntimeError(res.reason)
            m.optpass_setting = res.chosen.label
            return m
        v = Variant(f"{steps} steps / optpass {name}", setup, lambda m: timed(m, seeds, steps), None)
        v.quality = (lambda q: lambda m: {**q(m), "setting": m.optpass_setting})(quality(f"optpass {name}"))
        variants.append(v)
    if peers:
        for peer, settings in peer_chains(steps).items():
            def setup(peer=peer, settings=settings):
                if "MagCache" in peer:
                    base._mag_ratios = mag_ratios(base, steps)
                found = calibrate_peer(base, steps, settings)
                if found is None:
                    raise RuntimeError(f"no {peer} setting meets {BUDGET.min_psnr + 1} dB on the calibration seeds and "
                                       f"{BUDGET.min_psnr} dB on the held-out seeds")
                found[1].peer_setting = found[0]
                found[1].peer_denoise = peer_denoise(found[1])
                return found[1]
            v = Variant(f"{steps} steps / {peer}", setup, lambda m: timed(m, seeds, steps, m.peer_denoise), None)
            v.quality = (lambda name: lambda m: {**quality(name, m.peer_denoise)(m), "setting": m.peer_setting})(peer)
            variants.append(v)
    return variants


def speed_only(rounds: int, fraction_setting: dict[str, Any]) -> dict[str, Any]:
    """A random-weight larger DiT (12 blocks, 384 wide, 16x16 latents, 64 tokens): wall-clock only, fixed settings."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    big = DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=4,
                                num_layers=12, sample_size=16, patch_size=2, num_embeds_ada_norm=10,
                                norm_type="ada_norm_zero").eval()
    seeds, steps = (0,), 20
    variants = [Variant("uncached", lambda: big, lambda m: timed(m, seeds, steps))]
    for name, params in fraction_setting.items():
        def setup(name=name, params=params):
            m = copy.deepcopy(big)
            install_block_cache(m, STACK, make_policy(name, **params))
            return m
        variants.append(Variant(f"optpass {name} {params}", setup, lambda m: timed(m, seeds, steps),
                                lambda m: {"computed_fraction": cache_controller(m).stats.computed_fraction}))
    return run_scenario("dit_cache_speed_random_dit", variants, rounds=rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20 steps, two policies, one peer, two rounds")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--images", type=int, default=None, help="benchmark images per sampling call")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (2 if args.quick else 5)
    n = args.images or (4 if args.quick else 8)
    seeds = tuple(range(200, 200 + n))
    base = load_digit_dit()
    step_list = (20,) if args.quick else (50, 20)
    policies = ("first_block", "taylorseer") if args.quick else POLICIES
    for steps in step_list:
        images: dict[str, torch.Tensor] = {}
        variants = build_variants(base, steps, seeds, policies, peers=True, images=images)
        if args.quick:
            variants = [v for v in variants if "MagCache" not in v.name and "TaylorSeerCache" not in v.name]
        result = run_scenario(f"dit_cache_{steps}steps{'_quick' if args.quick else ''}", variants, rounds=rounds,
                              extra={"budget": BUDGET.to_dict(), "calibration_seeds": CALIB, "holdout_seeds": HOLDOUT,
                                     "benchmark_seeds": seeds})
        base_s = next(r for r in result["rows"] if r["variant"].endswith("uncached"))["sample_s"]["median"]
        for row in result["rows"]:
            if "sample_s" in row:
                row["speedup"] = base_s / row["sample_s"]["median"]
        write(result["scenario"], result)
        grid = RESULTS / f"dit_cache_{steps}steps{'_quick' if args.quick else ''}.png"
        save_grid(images, str(grid))
        print(f"[bench] image grid: {grid}")
        for row in result["rows"]:
            print(f"{row['variant']:45s} speedup {row.get('speedup', float('nan')):.2f}x  "
                  f"computed {row.get('computed_fraction', float('nan')):.3f}  PSNR {row.get('psnr_db', float('nan')):.1f}"
                  f"  {row.get('setting', row.get('error', ''))}")
    if not args.quick:
        speed_only(min(rounds, 3), {"taylorseer": {"threshold": 4, "order": 2, "warmup": 2},
                            "fixed_interval": {"threshold": 3, "warmup": 2}})


if __name__ == "__main__":
    main()
