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
        if name == "hpu":  # the op lists are plain files: checked first, so a typo shows on any machine
            from core import hpu

            hpu.configure_autocast()
        if importlib.util.find_spec(package) is None:
            raise UserError(f"--device {name} needs the '{package}' package, which is not installed: "
                            f"install the vendor's PyTorch plug-in or use --device cpu/cuda")
        if name == "hpu":
            hpu.load()
        return torch.device(name)
    return torch.device("cpu")


def resolve_precision(device, precision="auto"):
    """auto: bf16 on CUDA GPUs that support it (no loss scaling, no overflow skips; same speed as fp16), else fp16
    with a scaler (the recipes' use_fp16, which fp16 keeps when asked for); bf16 on HPU, fp32 on CPU."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision '{precision}': choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return {"hpu": "bf16"}.get(device.type, "fp32")
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


def step_boundary(device):
    """Called after backward and after the optimizer step: HPU lazy mode cuts its graph here (mark_step)."""
    if device.type == "hpu":
        from core import hpu

        hpu.mark_step()


def compile_for(device, model):
    """HPU eager mode compiles the model in place with torch.compile's hpu_backend; other devices leave it as is."""
    if device.type == "hpu":
        from core import hpu

        return hpu.compile_model(model)
    return model


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
