"""The optional C++ operators of ema/ and remap/, and the token gather MAE runs on each device.

`make -C ema` and `make -C remap` (run by `make setup`) build them for the installed torch; each library is loaded
once, on first use. When one is not built or does not load, the PyTorch fallback runs, with the same numbers, and the
log says once how to build it: a missing compiler never stops training. DINOSSL_FUSED_OPS=0 turns them off.
"""
import contextlib
import functools
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from core.log import setup_logger

REPO = Path(__file__).resolve().parents[1]
FALLBACKS = {"ema": "the teacher EMA uses two foreach calls", "remap": "MAE's token remapping uses torch.gather"}
_enabled = os.environ.get("DINOSSL_FUSED_OPS", "1") != "0"
_built = {}  # (folder, op, device type) -> whether its kernel is loaded


def library_path(name):
    """Where `make -C <name>` writes the library for this torch version."""
    return REPO / name / "build" / torch.__version__ / f"libdinossl_{name}.so"


@functools.cache
def load(name):
    """True when the operators of folder `name` are loaded; logged once either way."""
    path = library_path(name)
    log = setup_logger()
    if not path.is_file():
        log.info(f"fused {name} op not built, {FALLBACKS[name]} (same result): build it with "
                 f"`make -C {REPO / name} PYTHON={sys.executable}`")
        return False
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as e:
        log.warning(f"fused {name} op at {path} does not load ({e}), {FALLBACKS[name]}: rebuild it with "
                    f"`make -C {REPO / name} clean all PYTHON={sys.executable}`")
        return False
    if name == "remap":
        _register_remap_autograd()
    return True


@contextlib.contextmanager
def use_fused(enabled):
    """Within the block, use the fused ops where built (True) or the PyTorch fallbacks everywhere (False)."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


def has_fused(name, op, device_type):
    """Whether torch.ops.dinossl.<op> of folder `name` is enabled and built with a kernel for the device type.

    Looked up once, eagerly; torch.compile only reads the answer (a graph traced before any eager call uses the
    fallback, with the same result)."""
    if not _enabled:
        return False
    key = (name, op, device_type)
    if key not in _built and not torch.compiler.is_compiling():
        _built[key] = _has_kernel(name, op, device_type)
    return _built.get(key, False)


def _has_kernel(name, op, device_type):
    if device_type not in ("cpu", "cuda") or not load(name):
        return False
    key = torch._C.DispatchKey.CUDA if device_type == "cuda" else torch._C.DispatchKey.CPU
    return getattr(torch.ops.dinossl, op).default.has_kernel_for_dispatch_key(key)


def _register_remap_autograd():
    """Each remapping op is the other's gradient; fake kernels let torch.compile trace through them."""
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])
        ctx.num_tokens = inputs[0].shape[1]

    def gather_backward(ctx, grad):
        index, = ctx.saved_tensors
        return torch.ops.dinossl.scatter_add_tokens(grad, index, ctx.num_tokens), None

    def scatter_backward(ctx, grad):
        index, = ctx.saved_tensors
        return torch.ops.dinossl.gather_tokens(grad, index), None, None

    torch.library.register_autograd("dinossl::gather_tokens", gather_backward, setup_context=setup_context)
    torch.library.register_autograd("dinossl::scatter_add_tokens", scatter_backward, setup_context=setup_context)
    torch.library.register_fake("dinossl::gather_tokens")(
        lambda x, index: x.new_empty(x.shape[0], index.shape[1], x.shape[2]))
    torch.library.register_fake("dinossl::scatter_add_tokens")(
        lambda src, index, num_tokens: src.new_empty(src.shape[0], num_tokens, src.shape[2]))


def gather_tokens(x, index):
    """x[b, index[b, i], :] for (B, L, D) tokens and a (B, K) index: the fused op when built, a one-hot matmul on
    IPUs (which lack a fast gather), else torch.gather. All three give the same values and gradients."""
    if x.device.type == "ipu":
        return gather_tokens_onehot(x, index)
    if has_fused("remap", "gather_tokens", x.device.type):
        return torch.ops.dinossl.gather_tokens(x, index)
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def gather_tokens_onehot(x, index):
    """The gather as a (K x L) one-hot matrix times the tokens: a matmul, the form IPUs compile well. Exact for finite
    tokens (each output sums one token and zeros); an inf or nan anywhere in a sample spreads to all its outputs."""
    return F.one_hot(index, x.shape[1]).to(x.dtype) @ x
