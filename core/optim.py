"""Optimizers of the DINO and MAE recipes: parameter groups without decay on biases and norms, DINO's LARS,
MAE's layer-wise lr decay and its optimizer step."""
import torch

from core.errors import UserError

OPTIMIZERS = ("adamw", "sgd", "lars")


def param_groups(model):
    """Decay on weights only: biases and 1-d parameters (norms) get none, as in the official DINO and MAE code.

    The decayed group comes first and is flagged, so weight-decay schedules know which group to drive.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "weight_decay": 0.0, "apply_wd": False}]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio eta * ||w|| / ||g + wd * w||, skipped for 1-d parameters.

    timm's Lars uses a different denominator, so the original formula is kept here for faithfulness.
    """

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim != 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, g["eta"] * param_norm / update_norm, one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def build_optimizer(name, groups, device=None, **kwargs):
    """lr and weight decay start at 0 and are set every iteration from the schedules. AdamW on a CUDA or CPU
    `device` uses torch's fused kernel (one pass over each parameter and its state; 4x the per-parameter loop on a
    CPU core for ViT-S), elsewhere torch's default."""
    if name == "adamw":
        if device is not None and device.type in ("cpu", "cuda"):
            kwargs.setdefault("fused", True)
        return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, **kwargs)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9)
    if name == "lars":
        return LARS(groups)
    raise UserError(f"unknown optimizer '{name}': choose one of {', '.join(OPTIMIZERS)}")


def layer_id_for_vit(name, num_layers):
    """MAE's get_layer_id_for_vit: embeddings are layer 0, block i is layer i + 1, the rest (norms, head) the top."""
    if name in ("cls_token", "pos_embed", "register_tokens", "mask_token") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_layer_decay(model, weight_decay=0.05, no_weight_decay=(), layer_decay=0.75):
    """MAE's param_groups_lrd: layer i of L = depth + 1 gets lr_scale layer_decay^(L - i); 1-d parameters and
    `no_weight_decay` names get no decay. timm's param_groups_layer_decay needs a timm group_matcher and counts the
    layers it finds parameters for; our avg-pooled model has no top norm, so its scales would be one layer off."""
    num_layers = len(model.blocks) + 1
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name in no_weight_decay
        layer = layer_id_for_vit(name, num_layers)
        group = groups.setdefault((layer, no_decay), {
            "params": [], "lr_scale": layer_decay ** (num_layers - layer),
            "weight_decay": 0.0 if no_decay else weight_decay})
        group["params"].append(p)
    return list(groups.values())


def set_lr(optimizer, lr):
    """The scheduled lr, times each group's lr_scale (layer-wise decay) where it has one, as MAE's lr_sched."""
    for group in optimizer.param_groups:
        group["lr"] = float(lr) * group.get("lr_scale", 1.0)


def apply_gradients(optimizer, scaler=None, before_step=None):
    """One optimizer step after the micro-batches' backward passes: unscale fp16 gradients, run `before_step` on
    the true gradients (clipping, freezing), step, and clear them."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if before_step is not None:
        before_step()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
