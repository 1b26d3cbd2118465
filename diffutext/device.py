"""Where and in what precision the engine computes.

`resolve_device` turns `--device auto|cpu|cuda[:N]` into a torch device; `autocast` is the one
mixed-precision context for training and sampling (bf16/fp16 matrix products under
`torch.autocast`, float32 weights and reductions; fp32 turns autocast off); `resolve_precision`
decides what sampling's "auto" means on a device; `compute_dtype` is the dtype a hand-written op's
products should run in (the autocast dtype when autocast is on, else the input's own).
"""

from __future__ import annotations

import torch

from .config import Precision, choices

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(ValueError):
    """A device or precision that cannot be used here; one clear line."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise DeviceError(f"unknown device {device!r}; expected auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(device)


def autocast(device: torch.device, precision: Precision):
    """bf16/fp16: autocast's matrix products in that dtype, float32 weights and reductions; fp32: autocast off;
    auto: as `resolve_precision` decides for the device."""
    if precision not in choices(Precision):
        raise DeviceError(f"unknown precision {precision!r}; expected {', '.join(choices(Precision))}")
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=DTYPES[precision])


def resolve_precision(precision: Precision, device: torch.device) -> Precision:
    """ "auto" is bf16 where the device multiplies bf16 natively (a CUDA GPU with bf16, a CPU with
    AVX512-BF16/AMX, where a bf16 training step measured 1.3-2× faster), else fp32: on a CPU without
    them (AVX2 only) a bf16 product runs about 50× slower than fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        native = device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return "bf16" if native else "fp32"


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's matrix products run in: the autocast dtype while autocast is on, else x's own."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
