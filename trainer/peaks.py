# What MFU divides by: each device's dense peak TFLOP/s per numeric class, and which device a CUDA device
# name is. Unknown device or class: None (no MFU rather than a wrong one).
import re

from trainer.precision import low_precision_class, peak_class

# Dense peak TFLOP/s (TOP/s for int8) per device and numeric class. NVIDIA datasheets print the
# 2:4-sparsity figure first and the dense one in a footnote (or the other way round); the sparse
# figure is exactly 2x and no dense training run can reach it, so only dense figures belong here.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    # NVIDIA A100 Tensor Core GPU datasheet (SXM4 and PCIe, 40 GB and 80 GB quote the same peaks).
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0, "int8": 624.0},
    # NVIDIA H100 Tensor Core GPU datasheet, SXM column; fp32 66.9 from the Hopper whitepaper (the
    # datasheet rounds it to 67). Dense = the datasheet's sparse figure / 2 (1979 -> 989.4 etc.).
    "H100 SXM": {
        "fp32": 66.9,
        "tf32": 494.7,
        "bf16": 989.4,
        "fp16": 989.4,
        "fp8": 1978.9,
        "int8": 1978.9,
    },
    # Same datasheet, PCIe column (sparse 756 / 1513 / 3026 halved).
    "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0, "fp8": 1513.0, "int8": 1513.0},
    # Same datasheet, H100 NVL column, per GPU (sparse 835 / 1671 / 3341 halved).
    "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5, "fp8": 1670.5, "int8": 1670.5},
    # NVIDIA H200 Tensor Core GPU datasheet, SXM column: the same compute as H100 SXM, more memory.
    "H200": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "int8": 1978.9},
    # Same datasheet, H200 NVL column: the same figures as H100 NVL.
    "H200 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5, "fp8": 1670.5, "int8": 1670.5},
    # NVIDIA GH200 Grace Hopper Superchip datasheet: its Hopper GPU quotes the H100 SXM figures.
    "GH200": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "int8": 1978.9},
    # NVIDIA L4 Tensor Core GPU datasheet (sparse 120 / 242 / 485 halved).
    "L4": {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0, "fp8": 242.5, "int8": 242.5},
    # NVIDIA L40S datasheet, which prints the dense figures itself (bf16 362.05, not 733 / 2).
    "L40S": {"fp32": 91.6, "tf32": 183.0, "bf16": 362.05, "fp16": 362.05, "fp8": 733.0, "int8": 733.0},
}

# torch.cuda.get_device_name() -> PEAK_TFLOPS key, first match wins. The qualified H100 variants come
# before the SXM pattern; \b keeps "L4" from matching "L40S" and "H200" from matching "GH200". An H100
# name that says neither PCIe, NVL, SXM nor HBM3 matches nothing: we do not guess the form factor.
_DEVICE_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\bA100\b", "A100"),
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe"),
    (r"\bH100\b.*\bNVL\b", "H100 NVL"),
    (r"\bH100\b.*\b(SXM|HBM3)", "H100 SXM"),
    (r"\bGH200\b", "GH200"),
    (r"\bH200\b.*\bNVL\b", "H200 NVL"),
    (r"\bH200\b", "H200"),
    (r"\bL4\b", "L4"),
    (r"\bL40S\b", "L40S"),
)


def device_key(device_name: str) -> str | None:
    if re.search(r"\bMIG\b", device_name):
        # A MIG slice ("NVIDIA H200 MIG 3g.71gb") has a fraction of the chip's multiprocessors: the chip's
        # peak would understate its MFU. None: no MFU unless metrics.peak_tflops gives the slice's peak.
        return None
    for pattern, key in _DEVICE_PATTERNS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return key
    return None


def lookup_peak_tflops(device_name: str, precision: str, low_precision: bool = False) -> float | None:
    # low_precision: the peak of an fp8/int8 run's converted Linears (None for other precisions) instead of
    # the bf16 peak its MFU is reported against.
    numeric = low_precision_class(precision) if low_precision else peak_class(precision)  # raises if unknown
    key = device_key(device_name)
    # A device without that class (A100 has no fp8) is as unknown as an unknown device.
    return None if key is None or numeric is None else PEAK_TFLOPS[key].get(numeric)
