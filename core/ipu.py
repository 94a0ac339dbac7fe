"""Graphcore IPU adapter: poptorch compiles the whole DINO training step, so IPUs run their own loop.

Everything here that does not need poptorch is plain Python and tested on CPU: the pipeline split of the ViT blocks
over the IPUs of a replica, the global batch, the teacher-EMA factor of each micro-batch and the loss the compiled
step computes. The vendor calls are few: poptorch.Options, BeginBlock/Block for the pipeline, identity_loss,
DataLoader, trainingModel and its optimizer (fp16 with loss scaling); popdist when launched by poprun.

How the compiled step keeps the GPU semantics: poptorch runs the step once per micro-batch, accumulates gradients
and steps the optimizer every `--accum_iter` micro-batches. The student is fixed between optimizer steps, so the
teacher update of the previous step, t = m t + (1 - m) s, is applied as `accum_iter` updates with m^(1 / accum_iter)
inside the graph (the same end point, in any micro-batch order); at the end of an epoch the host applies the last
step's update, so checkpoints hold what the GPU loop holds. The DINO centre is updated on the host once per call from
the teacher output sums the step returns. lr, weight decay and centre advance once per host call, i.e. once per
optimizer step with --device_iterations 1 (the default); the EMA factor is given per step.
"""
import contextlib
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.augment import DataAugmentationDINO
from core.checkpoint import check_writable, restart_from_checkpoint, save_checkpoint
from core.data import ImageDataset
from core.dino import DINOLoss, ema_update
from core.errors import UserError
from core.log import append_json_line, check_finite, setup_logger
from core.schedule import cosine_schedule
from core.synthetic import ensure_default_data
from core.vision_transformer import SIZES


def block_ipus(split, depth):
    """The IPU of each transformer block for a split such as [4, 4, 4, 0] (blocks per IPU, in order)."""
    split = list(split or [])
    if not split or any(not isinstance(n, int) or n < 0 for n in split) or sum(split) != depth:
        n = max(len(split), 1)
        even = [depth // n + (i < depth % n) for i in range(n)]
        raise UserError(f"--ipu_pipeline {split} places {sum(split)} blocks but the model has {depth}: give one "
                        f"block count per IPU summing to {depth}, e.g. --ipu_pipeline {' '.join(map(str, even))}")
    return [ipu for ipu, n in enumerate(split) for _ in range(n)]


def stage_starts(split):
    """{index of the first block on an IPU: that IPU} for every IPU holding blocks."""
    ipus = block_ipus(split, sum(split))
    return {i: ipu for i, ipu in enumerate(ipus) if i == 0 or ipus[i - 1] != ipu}


def head_ipus(split):
    """(IPU of the head's MLP, IPU of its wide output layer and the loss): the last two IPUs, as in the IPU seeds,
    which keep the last IPU free of blocks ([4, 4, 4, 0]) because the 65536-wide layer fills it."""
    last = len(split) - 1
    return max(last - 1, 0), last


def global_batch(micro_batch, accum_iter, replicas, device_iterations):
    """Images per optimizer step over the pod (micro-batch x accumulation x replicas); device iterations are optimizer
    steps run per host call, so a call consumes global batch x device iterations images."""
    for name, value in (("--batch_size_per_gpu", micro_batch), ("--accum_iter", accum_iter),
                        ("--replication_factor", replicas), ("--device_iterations", device_iterations)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    return micro_batch * accum_iter * replicas


def micro_ema_factor(momentum_schedule, it, steps_per_epoch, accum_iter):
    """EMA factor applied on each micro-batch of optimizer step `it`: the previous step's momentum spread over the
    accumulation window (1, i.e. none, on an epoch's first step: the host applied it at the epoch's end)."""
    if it % steps_per_epoch == 0:
        return 1.0
    return float(momentum_schedule[it - 1]) ** (1.0 / accum_iter)


def row_ema_factors(momentum_schedule, it, steps_per_epoch, accum_iter, device_iterations, rows):
    """The host's ema_factor input for a call starting at step `it`: one row per micro-batch, device iterations
    outermost (poptorch feeds each device iteration the next slice), so each of the call's steps gets its own factor."""
    per_step = rows // device_iterations
    return torch.tensor([micro_ema_factor(momentum_schedule, it + k, steps_per_epoch, accum_iter)
                         for k in range(device_iterations) for _ in range(per_step)])


def dino_cross_entropy(student_out, teacher_out, center, teacher_temp, ncrops, student_temp=0.1):
    """DINO's loss with the centre and the teacher temperature as tensors, so one compiled graph serves every epoch
    (DINOLoss reads both from Python state, which a compiled step would freeze)."""
    student = (student_out / student_temp).chunk(ncrops)
    teacher = F.softmax((teacher_out - center) / teacher_temp, dim=-1).detach().chunk(2)
    terms = [torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
             for iq, q in enumerate(teacher) for v, s in enumerate(student) if v != iq]
    return sum(terms) / len(terms)


class DinoStep(nn.Module):
    """One micro-batch of DINO as the IPU runs it: teacher EMA, teacher and student forwards, loss.

    ema_factor, center and teacher_temp are host inputs with one row per micro-batch (poptorch splits every input
    along dim 0); the step returns the loss and the teacher outputs' sum for the host's centre update."""

    def __init__(self, student, teacher, ncrops, student_temp=0.1):
        super().__init__()
        self.student, self.teacher = student, teacher
        self.ncrops, self.student_temp = ncrops, student_temp
        self.ema_groups = [(student, teacher, None)]  # (student part, teacher part, IPU): set by pipeline()

    def forward(self, crops, ema_factor, center, teacher_temp, block=None):
        f = ema_factor[0]
        crops = [c.to(self.student.backbone.cls_token.dtype) for c in crops]  # fp16 when the step was halved
        with torch.no_grad():
            for s_part, t_part, ipu in self.ema_groups:
                with block(ipu) if block is not None and ipu is not None else contextlib.nullcontext():
                    for t, s in zip(t_part.parameters(), s_part.parameters()):
                        t.mul_(f).add_(s.detach() * (1 - f))
            teacher_out = self.teacher(crops[:2]).float()
        student_out = self.student(crops).float()
        loss = dino_cross_entropy(student_out, teacher_out, center[:1], teacher_temp[0], self.ncrops,
                                  self.student_temp)
        return loss, teacher_out.sum(dim=0, keepdim=True)

    def pipeline(self, poptorch, split):
        """Place patch embedding and blocks on the IPUs of the split, the head's MLP and output layer on the last two;
        each part's EMA runs on the IPU that holds it."""
        mlp_ipu, out_ipu = head_ipus(split)
        starts = stage_starts(split)
        groups = []
        for net in (self.student, self.teacher):
            vit, head = net.backbone, net.head
            vit.patch_embed = poptorch.BeginBlock(vit.patch_embed, ipu_id=0)
            for i, ipu in starts.items():
                vit.blocks[i] = poptorch.BeginBlock(vit.blocks[i], ipu_id=ipu)
            head.mlp = poptorch.BeginBlock(head.mlp, ipu_id=mlp_ipu)
            head.last_layer = poptorch.BeginBlock(head.last_layer, ipu_id=out_ipu)
        ipus = block_ipus(split, sum(split))
        s, t = self.student, self.teacher
        groups.append((_Params(s.backbone, "blocks"), _Params(t.backbone, "blocks"), 0))
        groups += [(s.backbone.blocks[i], t.backbone.blocks[i], ipu) for i, ipu in enumerate(ipus)]
        groups += [(s.head.mlp, t.head.mlp, mlp_ipu), (s.head.last_layer, t.head.last_layer, out_ipu)]
        self.ema_groups = groups


class _Params:
    """The parameters of a module outside one child (the ViT's embeddings and final norm, outside its blocks)."""

    def __init__(self, module, skip):
        self.module, self.skip = module, skip

    def parameters(self):
        return (p for name, p in self.module.named_parameters() if not name.startswith(self.skip + "."))


def require_poptorch():
    try:
        import poptorch
    except ImportError:
        raise UserError("--device ipu needs the 'poptorch' package from the Poplar SDK, which is not installed: "
                        "enable the SDK (source its enable.sh) or use --device cpu/cuda/hpu") from None
    return poptorch


def vit_depth(arch):
    if arch not in SIZES:
        raise UserError(f"--device ipu trains our ViTs ({', '.join(SIZES)}), not '{arch}': choose one of them")
    return SIZES[arch][1]


def build_options(poptorch, args, split, half, cache_dir, popdist=None):
    """poptorch.Options from the configuration; under poprun, popdist sets the replicas of this instance."""
    if popdist is not None:
        import popdist.poptorch

        opts = popdist.poptorch.Options(ipus_per_replica=len(split))
    else:
        opts = poptorch.Options()
        opts.replicationFactor(args.replication_factor)
    opts.randomSeed(args.seed)
    opts.deviceIterations(args.device_iterations)
    opts.Training.gradientAccumulation(args.accum_iter)
    opts.Training.accumulationAndReplicationReductionType(poptorch.ReductionType.Mean)
    opts.outputMode(poptorch.OutputMode.All)
    opts.enableExecutableCaching(str(cache_dir))
    if len(split) > 1:
        opts.setExecutionStrategy(poptorch.PipelinedExecution(poptorch.AutoStage.SameAsIpu))
    if half:
        opts.Precision.setPartialsType(torch.half)
    return opts


def poprun_env():
    """The popdist module when this process was started by poprun (one instance of several), else None."""
    try:
        import popdist
    except ImportError:
        return None
    return popdist if popdist.isPopdistEnvSet() else None


def param_groups(student):
    """Decay on weights only (as core.optim), with the head's output layer in groups of its own, whose lr is 0 while
    it is frozen (the compiled step cannot drop its gradients as the GPU loop does)."""
    groups = {(wd, last): [] for wd in (True, False) for last in (False, True)}
    for name, p in student.named_parameters():
        if p.requires_grad:
            groups[(not (name.endswith(".bias") or p.ndim == 1), "last_layer" in name)].append(p)
    return [{"params": ps, "weight_decay": 0.0, "apply_wd": wd, "last_layer": last}
            for (wd, last), ps in groups.items() if ps]


def train_dino(args, build_models):
    """The IPU form of main_dino.main: same data, models, schedules, checkpoint keys and log lines."""
    split = list(args.ipu_pipeline) if args.ipu_pipeline else [vit_depth(args.arch)]
    block_ipus(split, vit_depth(args.arch))
    batch = global_batch(args.batch_size_per_gpu, args.accum_iter, args.replication_factor, args.device_iterations)
    if args.precision not in ("auto", "fp16", "fp32"):
        raise UserError(f"--precision {args.precision} is not available on IPUs: use fp16 (auto) or fp32")
    poptorch = require_poptorch()
    popdist = poprun_env()
    if popdist is not None and popdist.getNumTotalReplicas() != args.replication_factor:
        raise UserError(f"poprun runs {popdist.getNumTotalReplicas()} replicas but --replication_factor is "
                        f"{args.replication_factor}: make them equal")
    local_replicas = popdist.getNumLocalReplicas() if popdist else args.replication_factor
    main_instance = popdist is None or popdist.getInstanceIndex() == 0
    log = setup_logger()
    output_dir = Path(args.output_dir)
    check_writable(output_dir)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    half = args.precision != "fp32"
    if args.clip_grad:
        log.warning("--clip_grad: DINO's per-parameter clipping does not run inside the compiled IPU step; ignored")

    data_path = Path(args.data_path) if args.data_path else ensure_default_data() / "train"
    dataset = ImageDataset(data_path, DataAugmentationDINO(args.global_crops_scale, args.local_crops_scale,
                                                           args.local_crops_number, args.global_crops_size,
                                                           args.local_crops_size), seed=args.seed)
    student, teacher = build_models()
    ncrops = args.local_crops_number + 2
    dino_loss = DINOLoss(args.out_dim, ncrops, args.warmup_teacher_temp, args.teacher_temp,
                         args.warmup_teacher_temp_epochs, args.epochs)
    groups = param_groups(student)
    optimizer = poptorch.optim.AdamW(groups, lr=0.0, loss_scaling=args.loss_scaling if half else None)
    opts = build_options(poptorch, args, split, half, output_dir / "ipu_cache", popdist)
    loader = poptorch.DataLoader(opts, dataset, batch_size=args.batch_size_per_gpu, shuffle=True, drop_last=True,
                                 num_workers=args.num_workers)
    calls = len(loader)
    if calls == 0:
        raise UserError(f"{data_path} has {len(dataset)} images, fewer than one call of "
                        f"{batch * args.device_iterations}: lower --batch_size_per_gpu, --accum_iter or "
                        f"--device_iterations")
    steps_per_epoch = calls * args.device_iterations
    schedules = {
        "lr": cosine_schedule(args.lr * batch / 256.0, args.min_lr, args.epochs, steps_per_epoch, args.warmup_epochs),
        "wd": cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, steps_per_epoch),
        "momentum": cosine_schedule(args.momentum_teacher, 1.0, args.epochs, steps_per_epoch),
    }
    ckpt_path = output_dir / "checkpoint.pth"
    start_epoch = restart_from_checkpoint(ckpt_path, {"epoch": 0}, student=student, teacher=teacher,
                                          optimizer=optimizer, dino_loss=dino_loss)["epoch"]
    step = DinoStep(student, teacher, ncrops)
    if len(split) > 1:
        step.pipeline(poptorch, split)
    if half:
        step.half()
    model = poptorch.trainingModel(_Traced(step, poptorch), opts, optimizer=optimizer)
    rows = args.device_iterations * args.accum_iter * local_replicas  # micro-batches of this instance per call
    log.info(f"IPU: {len(split)} IPU(s) per replica (blocks {split}), {args.replication_factor} replica(s), global "
             f"batch {batch}, {steps_per_epoch} steps per epoch, {'fp16' if half else 'fp32'}")

    for epoch in range(start_epoch, args.epochs):
        dataset.set_epoch(epoch)
        total = 0.0
        for i, (crops, _) in enumerate(loader):
            it = epoch * steps_per_epoch + i * args.device_iterations
            for g in optimizer.param_groups:
                frozen = g["last_layer"] and epoch < args.freeze_last_layer
                g["lr"] = 0.0 if frozen else float(schedules["lr"][it])
                g["weight_decay"] = float(schedules["wd"][it]) if g["apply_wd"] else 0.0
            model.setOptimizer(optimizer)
            factors = row_ema_factors(schedules["momentum"], it, steps_per_epoch, args.accum_iter,
                                      args.device_iterations, rows)
            temp = float(dino_loss.teacher_temp_schedule[epoch])
            loss, teacher_sums = model(crops, factors, dino_loss.center.expand(rows, -1), torch.full((rows,), temp))
            loss_value = float(loss.float().mean())
            check_finite(loss_value, it, epoch, ckpt_path, "Raise --loss_scaling headroom (lower it) or use fp32")
            dino_loss.pending_sum += teacher_sums.float().sum(dim=0, keepdim=True)
            dino_loss.pending_count += 2 * args.batch_size_per_gpu * rows
            dino_loss.update_center()
            total += loss_value
        model.copyWeightsToHost()
        ema_update(teacher, student, float(schedules["momentum"][(epoch + 1) * steps_per_epoch - 1]))
        model.copyWeightsToDevice()
        stats = {"loss": total / calls, "lr": float(schedules["lr"][(epoch + 1) * steps_per_epoch - 1])}
        save = {"student": {f"module.{k}": v for k, v in _fp32(student.state_dict()).items()},
                "teacher": _fp32(teacher.state_dict()),
                "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "args": vars(args),
                "dino_loss": dino_loss.state_dict()}
        if main_instance:
            save_checkpoint(save, ckpt_path)
            if args.saveckp_freq and epoch % args.saveckp_freq == 0:
                save_checkpoint(save, output_dir / f"checkpoint{epoch:04}.pth")
            append_json_line(output_dir / "log.txt", {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch})
        log.info(f"epoch {epoch}: " + ", ".join(f"{k} {v:.6g}" for k, v in stats.items()))
    model.detachFromDevice()
    return output_dir


def _fp32(state_dict):
    """Checkpoints keep fp32 weights, as the GPU loop's, whatever precision the IPU trained in."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


class _Traced(nn.Module):
    """The step with poptorch's calls bound in: per-IPU blocks for the EMA and the loss marked as the one to
    minimise."""

    def __init__(self, step, poptorch):
        super().__init__()
        self.step, self.poptorch = step, poptorch

    def forward(self, crops, ema_factor, center, teacher_temp):
        loss, teacher_sum = self.step(crops, ema_factor, center, teacher_temp,
                                      block=lambda ipu: self.poptorch.Block(ipu_id=ipu))
        return self.poptorch.identity_loss(loss, reduction="mean"), teacher_sum

