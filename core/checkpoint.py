"""One checkpoint module: atomic saves, exact resume, and loading of pretrained backbones from every layout we meet.

Checkpoints hold only tensors and plain Python values (args as a dict), so torch.load(weights_only=True) reads them.
"""
import argparse
import math
import os
import random
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from core.distributed import all_gather_objects, all_reduce_sum, get_rank, get_world_size, is_main_process
from core.errors import UserError
from core.hf_vit import is_foreign, read_foreign
from core.log import setup_logger
from core.vision_transformer import SIZES

PREFIXES = ("module.", "backbone.", "_orig_mod.")
VIT_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight")


def save_checkpoint(obj, path, write=None):
    """Write to a temporary file in the same folder, then rename: a crash mid-write never harms the last good file.

    write(obj, file) serialises (torch.save by default; e.g. safetensors for weight export). The file is created
    with mode 0666 like any open(), so the kernel applies the umask (and default ACLs) as torch.save would: 0644
    under umask 022, readable by colleagues on a shared cluster (mkstemp would leave 0600)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise UserError(f"cannot write checkpoint in {path.parent} ({e.strerror}): choose a writable --output_dir")
    try:
        with os.fdopen(fd, "wb") as f:
            (write or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_writable(folder):
    """Fail at start-up, not after an epoch of training, when the output folder cannot take files.

    The probe file is unique per process, so ranks sharing a folder never delete each other's probe.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test."):
            pass
    except OSError as e:
        raise UserError(f"output folder {folder} is not writable ({e.strerror}): choose another --output_dir")


def load_file(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: check the path")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file as load_safetensors

            return load_safetensors(path)
        # Official DINO and MAE checkpoints pickle their args as an argparse.Namespace: harmless, so allowed.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}): is it a PyTorch weights file?") from e


def rng_state():
    """Every random generator a training step draws from, so that a resumed run continues exactly.

    Callers store one per process (a list in rank order), since each process seeds its own generators. numpy's
    is among them (timm's Mixup draws from it between the steps of an epoch), as a tensor for weights_only loading.
    """
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "numpy" in state:
        keys, pos, has_gauss, cached_gaussian = state["numpy"]
        np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restart_from_checkpoint(path, run_variables=None, **objects):
    """Load each named object's state (model, optimizer, scaler, loss) and return the run variables (epoch...).

    A missing file means a fresh run and returns run_variables unchanged.
    """
    run_variables = dict(run_variables or {})
    if not Path(path).is_file():
        return run_variables
    return restore(load_file(path), path, run_variables, **objects)


def resume_run(output_dir, resume, run_variables, model, **objects):
    """(checkpoint or None, run variables) of a training run: its own checkpoint.pth in output_dir when there is
    one, so that a restarted job goes on; else the file of --resume, read as MAE's load_model reads it: the model,
    and the optimizer, scaler and run variables only when the file has an optimizer and an epoch."""
    own = Path(output_dir) / "checkpoint.pth"
    if own.is_file() or not resume:
        if resume:
            setup_logger().warning(f"--resume {resume} ignored: {own} is this run's latest state and goes on from "
                                   f"there (use a new --output_dir to start from {resume})")
        return (own if own.is_file() else None), restart_from_checkpoint(own, run_variables, model=model, **objects)
    ckpt = load_file(resume)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise UserError(f"--resume {resume} has no 'model' entry: give a checkpoint written by this script or "
                        f"the original")
    if "optimizer" in ckpt and "epoch" in ckpt:
        return Path(resume), restore(ckpt, resume, dict(run_variables), model=model, **objects)
    restore(ckpt, resume, {}, model=model)
    return Path(resume), dict(run_variables)


def restore(ckpt, path, run_variables, **objects):
    """Load the named objects' states from a loaded checkpoint; the run variables it holds replace the given ones."""
    for name, obj in objects.items():
        if obj is None:
            continue
        if name not in ckpt:
            raise UserError(f"checkpoint {path} has no '{name}' entry: it was written by another script; "
                            f"use a new --output_dir")
        state = ckpt[name]
        if isinstance(obj, torch.nn.Module):
            state = strip_prefixes(state, ("module.",))
        try:
            obj.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"cannot resume from {path}: its '{name}' does not match this run "
                            f"({str(e).splitlines()[0]}); use the same arguments or a new --output_dir") from e
    if "rng" in ckpt:
        states = ckpt["rng"]
        set_rng_state(states[get_rank() % len(states)])
    for key in run_variables:
        if key in ckpt:
            run_variables[key] = ckpt[key]
    return run_variables


class MidEpochCheckpoints:
    """Atomic checkpoints within an epoch every `minutes`, so that a run killed at any moment (kill -9, preemption)
    loses at most that much work and resumes at the exact batch, ending as an uninterrupted run would.

    Such a checkpoint holds what the run's `state(epoch, **position)` holds (every process calls it: RNG states
    are gathered, sharded models consolidated) for the epoch in progress, plus the position in it: `epoch_step`,
    its optimizer steps done, and `epoch_totals`, each process's running sums for the epoch's log line. Rank 0's
    clock decides for all processes, through one all-reduce, and only when asked: at steps that read the loss
    back anyway, so that no other step waits for the device."""

    def __init__(self, path, minutes, steps_per_epoch, state):
        self.path, self.seconds, self.steps, self.state = Path(path), minutes * 60, steps_per_epoch, state
        self.step, self.totals = 0, [{}]
        self.restart()

    def restart(self):
        """Count the interval from now: call after any checkpoint (the epoch's own, say)."""
        self.last = time.monotonic()

    def resume(self, run_variables):
        """Take the position of a restored checkpoint (`epoch_step` and `epoch_totals` among its run variables)."""
        self.step, self.totals = run_variables.get("epoch_step") or 0, run_variables.get("epoch_totals") or [{}]
        if self.step and len(self.totals) != get_world_size():
            raise UserError(f"{self.path} was written mid-epoch by {len(self.totals)} process(es), whose share of the "
                            f"epoch this run cannot continue: restart with {len(self.totals)} process(es), or "
                            f"start from an end-of-epoch checkpoint in a new --output_dir")

    def start(self):
        """(steps already done, this process's running totals) of the epoch about to run: the resumed position for
        the first epoch of a resumed run, (0, {}) after."""
        position = self.step, self.totals[get_rank() % len(self.totals)]
        self.step, self.totals = 0, [{}]
        return position

    def save_if_due(self, it, totals, device):
        """After optimizer step `it` (counted from the start of training), every process with its totals."""
        epoch, step = divmod(it + 1, self.steps)
        if not self.seconds or step == 0:  # the epoch's own checkpoint follows its last step
            return
        due = is_main_process() and time.monotonic() - self.last >= self.seconds
        if get_world_size() > 1:  # one process needs no collective, nor a device round trip
            due = bool(all_reduce_sum(torch.tensor([int(due)], device=device)).item())
        if not due:
            return
        save = self.state(epoch, epoch_step=step, epoch_totals=all_gather_objects(totals))
        if is_main_process():
            save_checkpoint(save, self.path)
        self.restart()


def strip_prefixes(state_dict, prefixes=PREFIXES):
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def extract_backbone(ckpt, checkpoint_key="teacher"):
    """The backbone's state dict from a full training checkpoint or a backbone-only file.

    Full DINO checkpoints hold `student`/`teacher` with `module.` and `backbone.` prefixes and a projection head, which
    is dropped; MAE and fine-tuning files hold `model` (an MAE decoder is dropped), linear-eval files `state_dict`.
    """
    if not isinstance(ckpt, dict):
        raise UserError("checkpoint is not a state dict: expected a dict of tensors or a training checkpoint")
    if checkpoint_key is None:  # whichever the file holds: MAE and fine-tuning `model`, else DINO's `teacher`
        checkpoint_key = next((k for k in ("model", "teacher") if isinstance(ckpt.get(k), dict)), "teacher")
    if checkpoint_key in ckpt and isinstance(ckpt[checkpoint_key], dict):
        sd = ckpt[checkpoint_key]
    elif any(isinstance(v, dict) for v in ckpt.values()) and not any(torch.is_tensor(v) for v in ckpt.values()):
        keys = [k for k, v in ckpt.items() if isinstance(v, dict) and any(torch.is_tensor(t) for t in v.values())]
        raise UserError(f"checkpoint has no key '{checkpoint_key}': pass --checkpoint_key with one of: "
                        f"{', '.join(keys) or 'none (it holds no weights)'}")
    else:
        sd = ckpt
    if any(k.startswith(("backbone.", "module.backbone.")) for k in sd):
        sd = {k: v for k, v in sd.items() if k.startswith(("backbone.", "module.backbone."))}
    sd = strip_prefixes(sd)
    if any(k.startswith("decoder_") for k in sd):  # an MAE with its decoder: the encoder is the backbone
        sd = {k: v for k, v in sd.items() if not k.startswith("decoder_") and k != "mask_token"}
    return from_timm_layout(sd)


def from_timm_layout(sd):
    """timm's register models (DINOv2 with registers) keep them in `reg_token` and give [CLS] no position slot
    (no_embed_class); a zero slot computes the same function in our layout, where [CLS] gets pos_embed[:, 0]."""
    if "reg_token" not in sd or "register_tokens" in sd:
        return sd
    sd = dict(sd)
    sd["register_tokens"] = sd.pop("reg_token")
    pos = sd["pos_embed"]
    sd["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    return sd


def to_timm_layout(sd):
    """Our layout as timm's: the same keys, less the mask token (unused by timm); with registers, timm's DINOv2
    layout, where the [CLS] position is folded into cls_token (it is a constant added to it)."""
    sd = {k: v for k, v in sd.items() if k != "mask_token"}
    if "register_tokens" in sd:
        sd["reg_token"] = sd.pop("register_tokens")
        sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
        sd["pos_embed"] = sd["pos_embed"][:, 1:]
    return sd


def vit_layout(sd):
    """Constructor options of our ViT read off a backbone state dict (patch size, size of the stored position grid,
    LayerScale, registers, mask token, and the named size), or None when it is not a ViT in a known layout."""
    if not all(k in sd for k in VIT_KEYS):
        return None
    embed_dim, _, patch_size, _ = sd["patch_embed.proj.weight"].shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
    return {
        "arch": next((a for a, (dim, d, _) in SIZES.items() if (dim, d) == (embed_dim, depth)), None),
        "embed_dim": embed_dim,
        "depth": depth,
        "patch_size": patch_size,
        "img_size": grid * patch_size,
        "init_values": 1e-5 if "blocks.0.ls1.gamma" in sd else None,
        "num_register_tokens": sd["register_tokens"].shape[1] if "register_tokens" in sd else 0,
        "mask_token": "mask_token" in sd,
    }


def stored_args(ckpt):
    """The training arguments a checkpoint carries: a dict in ours, an argparse.Namespace in the official ones."""
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return args if isinstance(args, dict) else {}


def read_backbone(path, checkpoint_key="teacher"):
    """(backbone state dict in our layout, stored training args) from any supported checkpoint file, Hugging Face
    ViT folder (or hub name in the local cache) or Google ViT .npz; checkpoint_key None picks `model` or `teacher`."""
    if is_foreign(path):
        return read_foreign(path, load_file)
    ckpt = load_file(path)
    return extract_backbone(ckpt, checkpoint_key), stored_args(ckpt)


def use_source_norm_eps(model, stored):
    """LayerNorms take the source's eps when it states one (Hugging Face ViTs: 1e-12, ours 1e-6), so that the
    converted model computes what the original does."""
    eps = stored.get("layer_norm_eps")
    if eps is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.eps = eps
    return model


def check_state_dict(model, state_dict, source, strict=True):
    """Stop with the shape or key differences listed, instead of loading half a model."""
    own = model.state_dict()
    if not set(own) & set(state_dict):
        raise UserError(f"{source} matches no known layout (our or official DINO checkpoints, backbone-only, timm ViT, "
                        f"DINOv2, Hugging Face or Google ViT): expected keys {_short(list(own))}, found "
                        f"{_short(list(state_dict))}")
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items()
             if k in own and v.shape != own[k].shape]
    if wrong:
        raise UserError(f"{source} is for another architecture (checkpoint vs model: {'; '.join(wrong[:3])}): "
                        f"pass the --arch and --patch_size it was trained with")
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if strict and (missing or unexpected):
        raise UserError(f"{source} does not match the model: missing keys {_short(missing)}, unexpected keys "
                        f"{_short(unexpected)}; check --arch/--checkpoint_key")
    return missing, unexpected


def _short(keys, n=6):
    return "[" + ", ".join(keys[:n]) + (f", ... {len(keys) - n} more" if len(keys) > n else "") + "]"


def load_backbone_state(model, state_dict, source, strict=True, assign=False):
    """Check, then load; a classifier head (timm, fine-tuned files) is dropped when the model has none.

    assign=True adopts the loaded tensors (as float32) instead of copying, for a model built on the meta device:
    no time spent initialising weights that are overwritten anyway."""
    own = model.state_dict()
    if not any(k.startswith("head.") for k in own):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    missing, unexpected = check_state_dict(model, state_dict, source, strict)
    if assign:
        state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=False, assign=assign)
    return missing, unexpected


def load_pretrained_weights(model, path, checkpoint_key="teacher", strict=True):
    """Load a backbone from our checkpoints, official DINO full checkpoints, backbone-only files, timm ViT state
    dicts, DINOv2-layout backbones, Hugging Face ViT folders or Google ViT .npz files."""
    state_dict, stored = read_backbone(path, checkpoint_key)
    result = load_backbone_state(model, state_dict, f"checkpoint {path}", strict)
    use_source_norm_eps(model, stored)
    return result
