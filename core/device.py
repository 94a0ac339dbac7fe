"""The one place that decides device, autocast dtype, grad scaler and distributed backend.

Entry points never test for CUDA themselves: they ask this module, so that HPU and IPU adapters plug in here.
"""
import contextlib
import importlib.util

import torch

from core.errors import UserError

DEVICES = ("auto", "cuda", "cpu", "hpu", "ipu")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Packages that must be importable before an accelerator other than CUDA is used.
ADAPTER_PACKAGES = {"hpu": "habana_frameworks", "ipu": "poptorch"}


def resolve_device(name="auto", local_rank=0):
    """auto picks CUDA when present, else CPU; HPU and IPU only when asked for, never as a silent fallback."""
    if name not in DEVICES:
        raise UserError(f"unknown device '{name}': choose one of {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu or auto")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name in ADAPTER_PACKAGES:
        package = ADAPTER_PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise UserError(f"--device {name} needs the '{package}' package, which is not installed: "
                            f"install the vendor's PyTorch plug-in or use --device cpu/cuda")
        if name == "hpu":
            importlib.import_module("habana_frameworks.torch.core")
        return torch.device(name)
    return torch.device("cpu")


def resolve_precision(device, precision="auto"):
    """auto keeps the published recipe on CUDA (fp16 with a scaler, as DINO's use_fp16) and fp32 on CPU."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision '{precision}': choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return {"cuda": "fp16", "hpu": "bf16"}.get(device.type, "fp32")
    return precision


def autocast(device, precision):
    """Mixed precision context for forward passes; fp32 is a no-op."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def make_grad_scaler(device, precision):
    """fp16 needs loss scaling; bf16 and fp32 do not, so they get None."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def distributed_backend(device):
    return {"cuda": "nccl", "hpu": "hccl"}.get(device.type, "gloo")


def synchronize(device):
    """Wait for queued kernels, so that timings and peak-memory readings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return None
