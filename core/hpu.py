"""Intel Gaudi (HPU) adapter: the few calls into habana_frameworks, imported only when --device hpu is asked for.

bf16 autocast runs through torch.autocast("hpu"); which aten ops it lowers to bf16 and which it keeps in fp32 come
from two text files (hpu/ops_bf16.txt, hpu/ops_fp32.txt, one aten op name a line) that the Gaudi bridge reads from
PT_HPU_AUTOCAST_LOWER_PRECISION_OPS_LIST / PT_HPU_AUTOCAST_FP32_OPS_LIST when habana_frameworks is imported. The
lists mirror CUDA autocast's policy for a ViT: matmuls and attention in bf16; normalisations, softmaxes, the loss
and reductions in fp32 (DINO's sharpened softmax over 65536 dims needs fp32). A user's own files, given through the
same variables, replace ours and are checked the same way.
"""
import os
import re
from pathlib import Path

import torch

from core.errors import UserError

OPS_DIR = Path(__file__).resolve().parents[1] / "hpu"
OP_LISTS = {"PT_HPU_AUTOCAST_LOWER_PRECISION_OPS_LIST": OPS_DIR / "ops_bf16.txt",
            "PT_HPU_AUTOCAST_FP32_OPS_LIST": OPS_DIR / "ops_fp32.txt"}
OP_NAME = re.compile(r"[a-z_][a-z0-9_]*")


def is_aten_op(name):
    return (OP_NAME.fullmatch(name) is not None and not name.startswith("__")
            and isinstance(getattr(torch.ops.aten, name, None), torch._ops.OpOverloadPacket))


def read_op_list(path):
    """The op names of one list file; a name that is not a torch.ops.aten op stops the run naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"autocast op list {path} does not exist: fix the path in the environment variable or unset it")
    names = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        name = line.strip()
        if not is_aten_op(name):
            raise UserError(f"{path}:{lineno}: '{name}' is not a torch.ops.aten operator: fix the spelling "
                            f"(one aten op name a line, e.g. 'linear') or remove the line")
        names.append(name)
    return names


def configure_autocast(environ=os.environ):
    """Point the Gaudi bridge at the op lists (ours unless the user set the variables) after checking every line.

    Must run before habana_frameworks is imported: the bridge reads the variables once, at import."""
    for var, default in OP_LISTS.items():
        environ.setdefault(var, str(default))
        read_op_list(environ[var])
    return {var: environ[var] for var in OP_LISTS}


def load():
    """Import the Gaudi bridge (registers the 'hpu' device, its autocast and the hccl process-group backend)."""
    configure_autocast()
    import habana_frameworks.torch.core  # noqa: F401
    import habana_frameworks.torch.distributed.hccl  # noqa: F401


def is_lazy():
    """Lazy mode (PT_HPU_LAZY_MODE=1) accumulates ops until mark_step; its default changed across releases, so the
    bridge is asked rather than the variable read."""
    from habana_frameworks.torch.utils.internal import is_lazy as bridge_is_lazy

    return bridge_is_lazy()


def mark_step():
    """End of a graph in lazy mode (after backward and after the optimizer step); eager mode needs none."""
    if is_lazy():
        import habana_frameworks.torch.core as htcore

        htcore.mark_step()


def compile_model(model):
    """Eager mode runs fastest through torch.compile with Gaudi's backend; lazy mode builds its own graphs. The
    module is compiled in place, so its state-dict keys and a DDP wrapper stay as they are."""
    if not is_lazy():
        model.compile(backend="hpu_backend")
    return model
