"""Fully sharded data parallel (FSDP2 `fully_shard`) for models too large to replicate, with checkpoints that
consolidate into the ordinary single-process layout, so a sharded run's files load anywhere (evaluations, resume
without --fsdp, another number of processes)."""
import sys

from core.distributed import get_world_size
from core.errors import UserError
from core.vision_transformer import Block


def check_fsdp(device, knn_every=0):
    """Sharding one process gains nothing: refuse it with the fix. The k-NN monitor calls the backbone outside the
    sharded model's forward, where its weights are only shards: refuse that too."""
    if get_world_size() < 2:
        where = "on CPU " if device.type == "cpu" else ""
        raise UserError(f"--fsdp {where}needs more than one process: launch with torchrun --nproc_per_node N, "
                        f"or drop --fsdp")
    if knn_every:
        raise UserError("--knn_every does not run on a sharded (--fsdp) model: drop it and run eval_knn.py on the "
                        "checkpoints")


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


def is_dtensor(tensor):
    """Sharded parameters are DTensors, which exist only once shard() has imported torch.distributed.tensor: runs
    without --fsdp never pay for importing it (or torch.distributed.checkpoint), about a second."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def is_sharded(model):
    return any(is_dtensor(p) for p in model.parameters())


def local(tensors):
    """The local shards of sharded parameters, so elementwise updates (the teacher EMA) run on plain tensors."""
    return [t.to_local() if is_dtensor(t) else t for t in tensors]


def _full(**options):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **options)


def model_state(model):
    """The full state dict on the first process, {} on the others (a collective: every process must call it)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full(cpu_offload=True))


def load_model_state(model, state_dict):
    if not is_sharded(model):
        return model.load_state_dict(state_dict)
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    return set_model_state_dict(model, state_dict, options=_full())


def _param_names(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state(model, optimizer):
    """The full optimizer state in torch's own layout (parameters numbered in group order), as an unsharded run
    writes it, so checkpoints do not depend on how the run was sharded. A collective, like model_state."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=_full(cpu_offload=True))
    if not full:  # processes other than the first receive nothing: only the first one writes checkpoints
        return {}
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[n] for n in g["params"]]}
              for g in full["param_groups"]]
    return {"state": {index[n]: s for n, s in full["state"].items()}, "param_groups": groups}


def load_optimizer_state(model, optimizer, state):
    if not is_sharded(model):
        return optimizer.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _param_names(model, optimizer)
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
              for g in state["param_groups"]]
    full = {"state": {names[i]: s for i, s in state["state"].items()}, "param_groups": groups}
    # Parameters that never had a gradient (DINO's output layer in its frozen first epoch) have no state, as torch's
    # own load_state_dict allows; torch.distributed.checkpoint gives them one by a zero step (a step count of 1, so
    # their first real Adam step would be bias-corrected as the second), which is dropped again.
    set_optimizer_state_dict(model, optimizer, full, options=_full(strict=False))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        if i not in state["state"]:
            optimizer.state.pop(p, None)


class Resumable:
    """What restart_from_checkpoint loads through load_state_dict: the consolidated layout into a sharded model
    (prefixes such as DDP's `module.` stripped, as for plain modules) or into its optimizer."""

    def __init__(self, model, optimizer=None):
        self.model, self.optimizer = model, optimizer

    def load_state_dict(self, state):
        if self.optimizer is not None:
            return load_optimizer_state(self.model, self.optimizer, state)
        return load_model_state(self.model, {k.removeprefix("module."): v for k, v in state.items()})
