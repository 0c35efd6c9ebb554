"""Hardware specs: dense peak FLOP/s per dtype, memory bandwidth and capacity, cache, launch floor.

Figures are dense (vendor sheets often quote 2:4-sparse peaks, twice these). Each spec keeps a
`source` note per figure. `resolve_target("cpu")` describes *this* machine; until it is calibrated
(see the cost-model issue) it uses the conservative figures measured in shared/PEERS.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from optpass.errors import UnknownTargetError

T, G = 1e12, 1e9
GiB = 1 << 30


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    kind: str  # "cpu" or "gpu"
    peak_flops: dict[str, float]  # dtype name -> dense FLOP/s (int8/int4: OP/s)
    mem_bandwidth: float  # bytes/s
    mem_capacity: float  # bytes
    cache_bytes: float  # last-level on-chip cache
    launch_floor: float  # seconds per dispatched op
    efficiency: dict[str, float] = field(default_factory=lambda: {"matmul": 0.7, "attention": 0.5, "memory": 0.8})
    source: dict[str, str] = field(default_factory=dict)
    calibrated: bool = False

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
        source={"peak_flops": "NVIDIA H100 SXM datasheet, dense (sparse figures halved)", "mem_bandwidth": "datasheet HBM3 3.35 TB/s"},
    ),
    "h200": HardwareSpec(
        "h200", "gpu",
        {"fp32": 67 * T, "tf32": 494.7 * T, "bf16": 989.4 * T, "fp16": 989.4 * T, "fp8": 1978.9 * T, "int8": 1978.9 * T},
        4.8e12, 141 * GiB, 50e6, 4e-6,
        source={"peak_flops": "NVIDIA H200 SXM datasheet, dense; same compute as H100", "mem_bandwidth": "datasheet HBM3e 4.8 TB/s"},
    ),
    "a100": HardwareSpec(
        "a100", "gpu",
        {"fp32": 19.5 * T, "tf32": 156 * T, "bf16": 312 * T, "fp16": 312 * T, "int8": 624 * T, "int4": 1248 * T},
        2.039e12, 80 * GiB, 40e6, 4e-6,
        source={"peak_flops": "NVIDIA A100 80GB SXM datasheet, dense", "mem_bandwidth": "datasheet HBM2e 2.039 TB/s"},
    ),
    "l4": HardwareSpec(
        "l4", "gpu",
        {"fp32": 30.3 * T, "tf32": 60 * T, "bf16": 121 * T, "fp16": 121 * T, "fp8": 242.5 * T, "int8": 242.5 * T},
        300e9, 24 * GiB, 48e6, 4e-6,
        source={"peak_flops": "NVIDIA L4 datasheet, dense (sparse figures halved)", "mem_bandwidth": "datasheet GDDR6 300 GB/s"},
    ),
    "rtx4090": HardwareSpec(
        "rtx4090", "gpu",
        {"fp32": 82.6 * T, "bf16": 165.2 * T, "fp16": 165.2 * T, "fp8": 330.3 * T, "int8": 660.6 * T, "int4": 1321.2 * T},
        1008e9, 24 * GiB, 72e6, 4e-6,
        source={"peak_flops": "Ada whitepaper, dense tensor figures with fp32 accumulate", "mem_bandwidth": "GDDR6X 1008 GB/s"},
    ),
    "m2": HardwareSpec(
        "m2", "gpu",
        {"fp32": 3.6 * T, "fp16": 3.6 * T, "bf16": 3.6 * T},
        100e9, 24 * GiB, 8e6, 10e-6,
        source={"peak_flops": "Apple M2 10-core GPU, 3.6 TFLOP/s fp32", "mem_bandwidth": "Apple: LPDDR5 100 GB/s"},
    ),
    "cpu-desktop": HardwareSpec(
        "cpu-desktop", "cpu",
        {"fp32": 1.0 * T, "bf16": 0.5 * T, "int8": 2.0 * T},
        50e9, 32 * GiB, 32e6, 5e-6,
        source={"peak_flops": "generic 8-core AVX2 desktop at 4 GHz: 8 x 32 fp32 FLOP/cycle", "mem_bandwidth": "dual-channel DDR4/DDR5, ~50 GB/s"},
    ),
}

# This machine before calibration: 2-core AVX-512 (VNNI, BF16) VM, figures from shared/PEERS.md.
_THIS_CPU = HardwareSpec(
    "cpu", "cpu",
    {"fp32": 120 * G, "bf16": 340 * G, "int8": 480 * G, "int8_wo": 100 * G, "int4_wo": 105 * G},
    36.4e9, 24 * GiB, 32e6, 8e-6,
    # bandwidth fraction each M=1 kernel reaches on weights that do not fit in cache (a 60-layer sweep)
    efficiency={"matmul": 0.8, "attention": 0.5, "memory": 0.6,
                "gemv_fp32": 0.26, "gemv_bf16": 0.25, "gemv_int8": 0.55, "gemv_int4": 0.42},
    source={
        "efficiency": "cold-weight GEMV sweep (60 x 576x1536): fp32 F.linear 9.4 GB/s, optpass int8 GEMV "
                      "~20 GB/s, aten int4pack ~15 GB/s, against the 36.4 GB/s triad; uncalibrated",
        "mem_bandwidth": "fused triad median, shared/PEERS.md (2 threads)",
        "peak_flops": "M=128 GEMM probe (576x1536): fp32 F.linear, bf16 F.linear, int8 torch._int_mm (W8A8), "
                      "and the weight-only int8/int4 kernels' compute rate; uncalibrated",
        "launch_floor": "eager dispatch of a small aten op, ~8 us",
    },
)

ALIASES = {"h100-sxm": "h100", "a100-80gb": "a100", "4090": "rtx4090", "desktop": "cpu-desktop"}


def get_spec(name: str) -> HardwareSpec:
    """A named spec (`h100`, `a100`, ...); `cpu` / `cuda` resolve to this machine."""
    key = ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else name
    if key == "cpu":
        return _THIS_CPU
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
