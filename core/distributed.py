"""torch.distributed set-up that works as one plain process, under torchrun (env://) and under SLURM."""
import contextlib
import os
import re
import subprocess

import torch
import torch.distributed as dist

from core.device import distributed_backend


def _slurm_master_addr():
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError):
        return first_host(nodes)


def first_host(nodelist):
    """The first host of a SLURM node list, for when scontrol is absent: 'gpu[03-05,9],cpu1' -> 'gpu03'."""
    m = re.match(r"([^,\[]+)(?:\[([^-,\]]+))?", nodelist)
    return m.group(1) + (m.group(2) or "")


def world_from_env():
    """(rank, world_size, local_rank) from torchrun's variables, else SLURM's, else a single process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        os.environ.setdefault("MASTER_ADDR", _slurm_master_addr())
        os.environ.setdefault("MASTER_PORT", "29500")
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), int(os.environ["SLURM_LOCALID"])
    return 0, 1, 0


def init_distributed(device):
    """Join the process group when there is more than one process; a single process never creates one."""
    rank, world_size, local_rank = world_from_env()
    if world_size > 1 and not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(distributed_backend(device), init_method="env://", rank=rank,
                                world_size=world_size, **kwargs)
    return rank, world_size, local_rank


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main_process():
    return get_rank() == 0


def barrier():
    if is_dist():
        dist.barrier()


def all_reduce_sum(tensor):
    """In-place sum over processes; a no-op for one process."""
    if is_dist():
        dist.all_reduce(tensor)
    return tensor


def all_gather_tensors(tensor):
    """Concatenate equally shaped tensors from every process along dim 0, in rank order."""
    if not is_dist():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_gather_objects(obj):
    """A list of every process's picklable object, in rank order (a one-element list for one process)."""
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def maybe_ddp(model, device):
    """Wrap in DDP only when there is more than one process, so a single process runs the plain module."""
    if get_world_size() == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def sync_unless(model_ddp, last_micro):
    """DDP's no_sync for all but a step's last micro-batch, so gradients are all-reduced once per step; a sharded
    (FSDP2) model likewise reduce-scatters only in the step's last backward."""
    if hasattr(model_ddp, "set_requires_gradient_sync"):
        model_ddp.set_requires_gradient_sync(last_micro)
        return contextlib.nullcontext()
    if last_micro or not isinstance(model_ddp, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model_ddp.no_sync()


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def cleanup():
    if is_dist():
        dist.destroy_process_group()
