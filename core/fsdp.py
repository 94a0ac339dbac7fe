"""Fully sharded data parallel (FSDP2 `fully_shard`) for models too large to replicate, with checkpoints that
consolidate into the ordinary single-process layout, so a sharded run's files load anywhere (evaluations, resume
without --fsdp, another number of processes)."""
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from core.distributed import get_world_size
from core.errors import UserError
from core.vision_transformer import Block

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def check_fsdp(device):
    """Sharding one process gains nothing and gloo has no fused collectives for it: refuse it with the fix."""
    if get_world_size() < 2:
        where = "on CPU " if device.type == "cpu" else ""
        raise UserError(f"--fsdp {where}needs more than one process: launch with torchrun --nproc_per_node N, "
                        f"or drop --fsdp")


def shard(model):
    """Each transformer block is its own unit (gathered just before it runs, freed after), then the rest. The root
    frees its weights after the forward too, so that a model only run forward (the teacher) is back in shards,
    matching the student's, when the EMA updates it."""
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module)
    fully_shard(model, reshard_after_forward=True)
    return model


def is_sharded(model):
    return any(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())


def local(tensors):
    """The local shards of sharded parameters, so elementwise updates (the teacher EMA) run on plain tensors."""
    return [t.to_local() if isinstance(t, torch.distributed.tensor.DTensor) else t for t in tensors]


def model_state(model):
    """The full state dict on the first process, {} on the others (a collective: every process must call it)."""
    if not is_sharded(model):
        return model.state_dict()
    return get_model_state_dict(model, options=FULL)


def load_model_state(model, state_dict):
    if not is_sharded(model):
        return model.load_state_dict(state_dict)
    return set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True))


def _param_names(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state(model, optimizer):
    """The full optimizer state in torch's own layout (parameters numbered in group order), as an unsharded run
    writes it, so checkpoints do not depend on how the run was sharded. A collective, like model_state."""
    if not is_sharded(model):
        return optimizer.state_dict()
    full = get_optimizer_state_dict(model, optimizer, options=FULL)
    if not full:  # processes other than the first receive nothing: only the first one writes checkpoints
        return {}
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[n] for n in g["params"]]}
              for g in full["param_groups"]]
    return {"state": {index[n]: s for n, s in full["state"].items()}, "param_groups": groups}


def load_optimizer_state(model, optimizer, state):
    if not is_sharded(model):
        return optimizer.load_state_dict(state)
    names = _param_names(model, optimizer)
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
              for g in state["param_groups"]]
    full = {"state": {names[i]: s for i, s in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))


class Resumable:
    """What restart_from_checkpoint loads through load_state_dict: the consolidated layout into a sharded model
    (prefixes such as DDP's `module.` stripped, as for plain modules) or into its optimizer."""

    def __init__(self, model, optimizer=None):
        self.model, self.optimizer = model, optimizer

    def load_state_dict(self, state):
        if self.optimizer is not None:
            return load_optimizer_state(self.model, self.optimizer, state)
        return load_model_state(self.model, {k.removeprefix("module."): v for k, v in state.items()})
