"""DINO: projection head, self-distillation loss with centering, multi-crop wrapper and the teacher EMA."""
import itertools

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.custom_ops import has_fused
from core.distributed import all_reduce_sum
from core.fsdp import local


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g * v / ||v|| per output unit.

    Written out (rather than torch's weight-norm parametrisation) to keep the official keys `weight_g`, `weight_v`.
    x (v/||v||)^T = (x v^T) / ||v|| per output unit, so a batch smaller than the weight (the recipe's 65536 x 256 on
    a few dozen crops) scales the output rather than building the normalised weight, in the forward and backward.
    """

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))

    def forward(self, x):
        scale = self.weight_g / self.weight_v.norm(dim=1, keepdim=True)
        if x.numel() < self.weight_v.numel():  # fewer (rows x inputs) than weights: scale the output instead
            out = F.linear(x, self.weight_v)
            return out * scale.view(-1).to(out.dtype)
        return F.linear(x, self.weight_v * scale)


class DINOHead(nn.Module):
    """MLP (3 layers by default, GELU, optional BN) to a 256-d bottleneck, L2 normalisation, weight-normed output.

    With norm_last_layer the output layer's norm g stays at 1, which the paper finds stabilises training.
    """

    def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3, hidden_dim=2048,
                 bottleneck_dim=256):
        super().__init__()
        nlayers = max(nlayers, 1)
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers = []
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                if use_bn:
                    layers.append(nn.BatchNorm1d(dims[i + 1]))
                layers.append(nn.GELU())
        self.mlp = layers[0] if nlayers == 1 else nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad = not norm_last_layer

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    """Runs the backbone once per run of same-resolution crops, then the head once on all [CLS] outputs."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops):
        if not isinstance(crops, (list, tuple)):
            crops = [crops]
        outputs = []
        for _, run in itertools.groupby(crops, key=lambda c: c.shape[-1]):
            out = self.backbone(torch.cat(list(run)))
            outputs.append(out[0] if isinstance(out, tuple) else out)
        return self.head(torch.cat(outputs))


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher and the student over every pair of different views.

    The centre is updated from the teacher outputs seen since the last update (summed over processes), once per
    optimizer step, so gradient accumulation sees the same centre as one large batch.
    """

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs,
                 student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("pending_sum", torch.zeros(1, out_dim), persistent=False)
        self.pending_count = 0
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(max(nepochs - warmup_teacher_temp_epochs, 0)) * teacher_temp,
        ))

    def forward(self, student_output, teacher_output, epoch):
        """Mean over the pairs (teacher view i, student view v != i) of CE(q_i, p_v), as the original's double loop,
        but with each student view's log-softmax computed once: the pairs of student view v sum to
        -(sum_i q_i - q_v) . log p_v, where q_v is only subtracted for the views the teacher also saw."""
        batch = len(student_output) // self.ncrops
        log_p = F.log_softmax(student_output / self.student_temp, dim=-1).view(self.ncrops, batch, -1)
        temp = self.teacher_temp_schedule[epoch]
        q = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().view(-1, batch, log_p.shape[-1])
        n_same = min(len(q), self.ncrops)
        cross = (q.sum(0) * log_p.sum(0)).sum(-1)
        same = (q[:n_same] * log_p[:n_same]).sum(dim=(0, -1))
        n_terms = len(q) * self.ncrops - n_same
        self.accumulate_center(teacher_output)
        return -(cross - same).mean() / n_terms

    @torch.no_grad()
    def accumulate_center(self, teacher_output):
        self.pending_sum += teacher_output.float().sum(dim=0, keepdim=True)
        self.pending_count += len(teacher_output)

    @torch.no_grad()
    def update_center(self):
        """Fold the teacher outputs since the last call into the centre with an EMA of their all-process mean."""
        if self.pending_count == 0:
            return
        stats = torch.cat([self.pending_sum.flatten(), self.pending_sum.new_tensor([self.pending_count])])
        stats = all_reduce_sum(stats)
        batch_center = (stats[:-1] / stats[-1]).view_as(self.center)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
        self.pending_sum.zero_()
        self.pending_count = 0


@torch.no_grad()
def ema_update(teacher, student, momentum):
    """teacher = m * teacher + (1 - m) * student, over all parameters at once: one pass of the fused op of ema/ when
    built, else two foreach calls rounding the same way. Sharded (--fsdp) models update their local shards."""
    t = local(teacher.parameters())
    s = local(p.detach() for p in student.parameters())
    if t and has_fused("ema", "ema_update_", t[0].device.type):
        torch.ops.dinossl.ema_update_(t, s, momentum)
        return
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1 - momentum)


@torch.no_grad()
def clip_gradients(model, clip):
    """Per-parameter clipping as in the original DINO (not a global norm): each grad is scaled by
    min(1, clip / (norm + 1e-6)); a few foreach kernels for all parameters, and no host sync."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return []
    norms = torch._foreach_norm(grads)
    coefs = torch._foreach_add(norms, 1e-6)
    torch._foreach_reciprocal_(coefs)
    torch._foreach_mul_(coefs, clip)
    torch._foreach_clamp_max_(coefs, 1.0)
    torch._foreach_mul_(grads, coefs)
    return norms


def compile_backbones(*models, backend="inductor"):
    """torch.compile each wrapper's backbone in place (state-dict keys unchanged) with static shapes: one graph
    per crop resolution, compiled on its first step and reused after, instead of a dynamic-shape graph."""
    for model in models:
        model.backbone.compile(dynamic=False, backend=backend)


def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    """Keep the head's output layer fixed for the first epochs, which helps DINO avoid early collapse."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


def has_batchnorms(model):
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


