"""Hardware specs: dense peak FLOP/s per dtype, memory bandwidth and capacity, cache, launch floor.

Figures are dense (vendor sheets often quote 2:4-sparse peaks, twice these). Each spec keeps a
`source` note per figure. `get_spec("cpu")` describes *this* machine: the calibration that
`optpass calibrate --target cpu` cached for this torch version / thread count / ISA (cost_models/calibrate.py),
or, uncalibrated, the figures measured in shared/PEERS.md. Named GPU specs are datasheet figures and
never calibrated here, so they rank rewrites (ordering) but their absolute times are not validated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from optpass.errors import UnknownTargetError

T, G = 1e12, 1e9
GiB = 1 << 30


def _default_efficiency() -> dict[str, float]:
    return {"matmul": 0.7, "attention": 0.5, "memory": 0.8, "elementwise": 0.6}


@dataclass(frozen=True)
class HardwareSpec:
    """Roofline figures for one target. `efficiency` is the achievable fraction of peak per op kind
    ("matmul", "attention", "memory", "elementwise", "gemv_<scheme>"); `linear` holds calibrated per-scheme
    linear-layer figures (see `LinearCalibration`), empty for datasheet specs."""

    name: str
    kind: str  # "cpu" or "gpu"
    peak_flops: dict[str, float]  # dtype name -> dense FLOP/s (int8/int4: OP/s)
    mem_bandwidth: float  # bytes/s
    mem_capacity: float  # bytes
    cache_bytes: float  # last-level on-chip cache
    launch_floor: float  # seconds per dispatched op
    efficiency: dict[str, float] = field(default_factory=_default_efficiency)
    source: dict[str, str] = field(default_factory=dict)
    calibrated: bool = False
    # CPU eager ops pay their dispatch in series with the work (t = launch + max(...)); GPU launches are
    # asynchronous and overlap with earlier kernels (t = max(compute, memory, launch)).
    launch_additive: bool = False
    # relative error the model admits on a predicted latency change: a rewrite predicted to gain less is
    # not applied under passes="auto". Datasheet GPU specs are ordering-only, hence the wide band.
    error_band: float = 0.25
    linear: dict[str, dict] = field(default_factory=dict)  # scheme -> {"overhead": s, "rates": {M: FLOP/s}, "bw": B/s}
    attention_rates: dict[int, float] = field(default_factory=dict)  # causal SDPA seq len -> FLOP/s (calibrated)
    module_floor: float = 0.0  # seconds per nn.Module call in eager mode (Python overhead)
    attention_floor: float = 0.0  # seconds per fused-attention call on top of the launch floor (CPU SDPA setup)
    # seconds per block-sparse attention call beyond its math (layout conversion, dispatch), calibrated on CPU;
    # None: the formula's default (`cost_models/sparse_attention.py`)
    sparse_call_floor: float | None = None

    def flops(self, dtype: str) -> float:
        """Peak for `dtype`; int weight-only GEMMs compute in the activation dtype."""
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        raise UnknownTargetError(f"{self.name}: no peak FLOP/s recorded for dtype {dtype!r}; known: {sorted(self.peak_flops)}")


SPECS: dict[str, HardwareSpec] = {
    "h100": HardwareSpec(
        "h100", "gpu",
        {"fp32": 67 * T, "tf32": 494.7 * T, "bf16": 989.4 * T, "fp16": 989.4 * T, "fp8": 1978.9 * T, "int8": 1978.9 * T},
        3.35e12, 80 * GiB, 50e6, 4e-6,
        source={"peak_flops": "NVIDIA H100 SXM datasheet, dense (sparse figures halved); no int4 tensor-core path on Hopper",
                "mem_bandwidth": "datasheet HBM3 3.35 TB/s", "mem_capacity": "80 GB", "cache_bytes": "50 MB L2",
                "launch_floor": "typical CUDA kernel launch, ~4 us"},
    ),
    "h200": HardwareSpec(
        "h200", "gpu",
        {"fp32": 67 * T, "tf32": 494.7 * T, "bf16": 989.4 * T, "fp16": 989.4 * T, "fp8": 1978.9 * T, "int8": 1978.9 * T},
        4.8e12, 141 * GiB, 50e6, 4e-6,
        source={"peak_flops": "NVIDIA H200 SXM datasheet, dense; same compute as H100", "mem_bandwidth": "datasheet HBM3e 4.8 TB/s",
                "mem_capacity": "141 GB", "cache_bytes": "50 MB L2", "launch_floor": "typical CUDA kernel launch, ~4 us"},
    ),
    "a100": HardwareSpec(
        "a100", "gpu",
        {"fp32": 19.5 * T, "tf32": 156 * T, "bf16": 312 * T, "fp16": 312 * T, "int8": 624 * T, "int4": 1248 * T},
        2.039e12, 80 * GiB, 40e6, 4e-6,
        source={"peak_flops": "NVIDIA A100 80GB SXM datasheet, dense (int4 tensor cores: 1248 TOPS)",
                "mem_bandwidth": "datasheet HBM2e 2.039 TB/s", "mem_capacity": "80 GB", "cache_bytes": "40 MB L2",
                "launch_floor": "typical CUDA kernel launch, ~4 us"},
    ),
    "l4": HardwareSpec(
        "l4", "gpu",
        {"fp32": 30.3 * T, "tf32": 60 * T, "bf16": 121 * T, "fp16": 121 * T, "fp8": 242.5 * T, "int8": 242.5 * T},
        300e9, 24 * GiB, 48e6, 4e-6,
        source={"peak_flops": "NVIDIA L4 datasheet, dense (sparse figures halved)", "mem_bandwidth": "datasheet GDDR6 300 GB/s",
                "mem_capacity": "24 GB", "cache_bytes": "48 MB L2", "launch_floor": "typical CUDA kernel launch, ~4 us"},
    ),
    "rtx4090": HardwareSpec(
        "rtx4090", "gpu",
        {"fp32": 82.6 * T, "bf16": 165.2 * T, "fp16": 165.2 * T, "fp8": 330.3 * T, "int8": 660.6 * T, "int4": 1321.2 * T},
        1008e9, 24 * GiB, 72e6, 4e-6,
        source={"peak_flops": "Ada whitepaper, dense tensor figures with fp32 accumulate (int4: 1321 TOPS)",
                "mem_bandwidth": "GDDR6X 1008 GB/s", "mem_capacity": "24 GB", "cache_bytes": "72 MB L2",
                "launch_floor": "typical CUDA kernel launch, ~4 us"},
    ),
    "m2": HardwareSpec(
        "m2", "gpu",
        {"fp32": 3.6 * T, "fp16": 3.6 * T, "bf16": 3.6 * T},
        100e9, 24 * GiB, 8e6, 10e-6,
        source={"peak_flops": "Apple M2 10-core GPU, 3.6 TFLOP/s fp32", "mem_bandwidth": "Apple: LPDDR5 100 GB/s",
                "mem_capacity": "24 GB unified (largest configuration)", "cache_bytes": "8 MB system-level cache",
                "launch_floor": "Metal command dispatch, ~10 us"},
    ),
    "cpu-desktop": HardwareSpec(
        "cpu-desktop", "cpu",
        {"fp32": 1.0 * T, "bf16": 0.5 * T, "int8": 2.0 * T},
        50e9, 32 * GiB, 32e6, 5e-6, launch_additive=True, error_band=0.25,
        source={"peak_flops": "generic 8-core AVX2 desktop at 4 GHz: 8 x 32 fp32 FLOP/cycle", "mem_bandwidth": "dual-channel DDR4/DDR5, ~50 GB/s",
                "mem_capacity": "32 GB", "cache_bytes": "32 MB L3", "launch_floor": "eager aten dispatch, ~5 us"},
    ),
}

# This machine before calibration: 2-core AVX-512 (VNNI, BF16) VM, figures from shared/PEERS.md.
_THIS_CPU = HardwareSpec(
    "cpu", "cpu",
    {"fp32": 120 * G, "bf16": 340 * G, "int8": 480 * G, "int8_wo": 100 * G, "int4_wo": 105 * G},
    36.4e9, 24 * GiB, 32e6, 8e-6,
    # bandwidth fraction each M=1 kernel reaches on weights that do not fit in cache (a 60-layer sweep)
    efficiency={"matmul": 0.8, "attention": 0.5, "memory": 0.6, "elementwise": 0.5,
                "gemv_fp32": 0.26, "gemv_bf16": 0.25, "gemv_int8": 0.55, "gemv_int4": 0.42},
    launch_additive=True, error_band=0.10, module_floor=4e-6,
    source={
        "efficiency": "cold-weight GEMV sweep (60 x 576x1536): fp32 F.linear 9.4 GB/s, optpass int8 GEMV "
                      "~20 GB/s, aten int4pack ~15 GB/s, against the 36.4 GB/s triad; uncalibrated",
        "mem_bandwidth": "fused triad median, shared/PEERS.md (2 threads)",
        "peak_flops": "M=128 GEMM probe (576x1536): fp32 F.linear, bf16 F.linear, int8 torch._int_mm (W8A8), "
                      "and the weight-only int8/int4 kernels' compute rate; uncalibrated",
        "launch_floor": "eager dispatch of a small aten op, ~8 us",
        "calibration": "uncalibrated: run `optpass calibrate --target cpu`",
    },
)

ALIASES = {"h100-sxm": "h100", "a100-80gb": "a100", "4090": "rtx4090", "desktop": "cpu-desktop"}


def uncalibrated_cpu() -> HardwareSpec:
    """This machine's spec before calibration (also the base a calibration overrides)."""
    return _THIS_CPU


def get_spec(name: str) -> HardwareSpec:
    """A named spec (`h100`, `a100`, ...); `cpu` / `cuda` resolve to this machine (`cpu`: calibrated if a
    calibration for this torch version, thread count and ISA is cached, else `source["calibration"]` says not)."""
    key = ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else name
    if key == "cpu":
        from optpass.cost_models.calibrate import calibrated_spec

        return calibrated_spec() or _THIS_CPU
    if key == "cuda":
        return _local_gpu()
    if key not in SPECS:
        raise UnknownTargetError(
            f"unknown target {name!r}; known targets: cpu, cuda, {', '.join(sorted(SPECS))}"
        )
    return SPECS[key]


def _local_gpu() -> HardwareSpec:
    import torch

    if not torch.cuda.is_available():
        raise UnknownTargetError("target 'cuda': no CUDA device on this machine; name a GPU spec (e.g. 'h100') to plan for one")
    device = torch.cuda.get_device_name().lower()
    for key in ("h200", "h100", "a100", "l4", "4090"):
        if key in device:
            return get_spec(key)
    raise UnknownTargetError(f"target 'cuda': no spec for device {device!r}; pass one of {', '.join(sorted(SPECS))}")
