"""DINO self-supervised pretraining (Caron et al., 2021): a student ViT learns to match a momentum teacher across
multi-crop views. Defaults are the official facebookresearch/dino recipe; `--config NAME` picks one from configs.yml.

    python main_dino.py --data_path /path/to/images --output_dir runs/dino      # one process
    torchrun --nproc_per_node 8 main_dino.py --config vit_small_pod16 ...      # many
"""
import argparse
import math
import random
from pathlib import Path

import numpy as np
import torch

from core import distributed as dist
from core.augment import DataAugmentationDINO
from core import fsdp
from core.checkpoint import (MidEpochCheckpoints, check_writable, restart_from_checkpoint, rng_state,
                             save_checkpoint)
from core.config import add_launcher_args, bool_flag, parse_args
from core.data import ImageDataset, MicroBatches, build_loader
from core import ipu
from core.device import (autocast, compile_for, make_grad_scaler, resolve_device, resolve_precision,
                         step_boundary)
from core.dino import (DINOHead, DINOLoss, MultiCropWrapper, cancel_gradients_last_layer, clip_gradients,
                       compile_backbones, ema_update, has_batchnorms)
from core.errors import UserError, run_cli
from core.gpu_augment import GPUAugmentDINO, require_kornia
from core.knn import add_monitor_args, build_knn_monitor
from core.log import LossWatch, Progress, TensorBoard, append_json_line, epoch_1000x, epoch_totals, setup_logger
from core.optim import OPTIMIZERS, apply_gradients, build_optimizer, param_groups
from core.schedule import cosine_schedule
from core.synthetic import ensure_default_data
from core.vision_transformer import build_vit


def get_args_parser():
    p = argparse.ArgumentParser("DINO", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, type=str,
                   help="Named configuration from configs.yml (section main_dino) or a YAML file; flags override it.")
    # Model
    p.add_argument("--arch", default="vit_small", type=str,
                   help="vit_tiny, vit_small, vit_base, vit_large, or timm/<model_name> for any timm backbone.")
    p.add_argument("--patch_size", default=16, type=int,
                   help="Patch size in pixels (8, 14 or 16 for DINO). Smaller patches are better but slower.")
    p.add_argument("--out_dim", default=65536, type=int,
                   help="Output dimension of the DINO head; large values (65k) work well for complex data.")
    p.add_argument("--norm_last_layer", default=True, type=bool_flag,
                   help="Keep the norm of the head's last layer fixed: more stable, false can perform better.")
    p.add_argument("--momentum_teacher", default=0.996, type=float,
                   help="Base EMA momentum of the teacher, raised to 1 with a cosine schedule. 0.9995 for batch 256.")
    p.add_argument("--use_bn_in_head", default=False, type=bool_flag, help="Batch norm in the projection head.")
    # Temperatures
    p.add_argument("--warmup_teacher_temp", default=0.04, type=float, help="Initial teacher temperature.")
    p.add_argument("--teacher_temp", default=0.04, type=float,
                   help="Final teacher temperature (after warm-up); raise to 0.07 with care, above it is unstable.")
    p.add_argument("--warmup_teacher_temp_epochs", default=0, type=int, help="Epochs of teacher temperature warm-up.")
    # Optimisation
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="Mixed precision: auto is bf16 on CUDA GPUs that support it, else fp16 with loss scaling "
                        "(the recipe's use_fp16, also when asked for with fp16); fp32 on CPU.")
    p.add_argument("--use_fp16", default=None, type=bool_flag,
                   help="The original's switch, overriding --precision when given: true is fp16 with loss scaling "
                        "on CUDA (auto on other devices), false is fp32. Try false if the loss is unstable.")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "hpu", "ipu"],
                   help="auto picks CUDA when present, else CPU; hpu/ipu need their vendor packages.")
    p.add_argument("--weight_decay", default=0.04, type=float, help="Initial weight decay (not on biases and norms).")
    p.add_argument("--weight_decay_end", default=0.4, type=float, help="Final weight decay (cosine schedule).")
    p.add_argument("--clip_grad", default=3.0, type=float,
                   help="Maximal gradient norm of each parameter (0 disables clipping).")
    p.add_argument("--batch_size_per_gpu", default=64, type=int, help="Images per process and per step.")
    p.add_argument("--accum_iter", default=1, type=int,
                   help="Micro-batches per optimizer step; the teacher EMA and the centre update once per step.")
    p.add_argument("--epochs", default=100, type=int, help="Number of training epochs.")
    p.add_argument("--freeze_last_layer", default=1, type=int,
                   help="Epochs during which the head's output layer is kept fixed.")
    p.add_argument("--lr", default=0.0005, type=float,
                   help="Peak learning rate after warm-up, for a global batch of 256; scaled linearly with the batch.")
    p.add_argument("--warmup_epochs", default=10, type=int, help="Epochs of linear learning-rate warm-up.")
    p.add_argument("--min_lr", default=1e-6, type=float, help="Final learning rate of the cosine schedule.")
    p.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS, help="adamw is recommended for ViTs.")
    p.add_argument("--drop_path_rate", default=0.1, type=float, help="Stochastic depth rate of the student.")
    # Multi-crop
    p.add_argument("--global_crops_scale", default=(0.4, 1.0), type=float, nargs=2,
                   help="Scale range of the two global crops (RandomResizedCrop).")
    p.add_argument("--local_crops_number", default=8, type=int, help="Number of small local crops (0 disables).")
    p.add_argument("--local_crops_scale", default=(0.05, 0.4), type=float, nargs=2,
                   help="Scale range of the local crops.")
    p.add_argument("--global_crops_size", default=224, type=int, help="Side of the global crops in pixels.")
    p.add_argument("--local_crops_size", default=96, type=int, help="Side of the local crops in pixels.")
    # k-NN monitor: --knn_every, --knn_data_path, --knn_max_train
    add_monitor_args(p)
    # Misc
    p.add_argument("--data_path", default=None, type=str,
                   help="ImageFolder tree or flat folder of images; omitted: the embedded generated data set.")
    p.add_argument("--output_dir", default=".", type=str,
                   help="Where checkpoints and log.txt go; a run restarted here resumes where it stopped.")
    p.add_argument("--saveckp_freq", default=20, type=int, help="Keep checkpointNNNN.pth every this many epochs.")
    p.add_argument("--checkpoint_every_minutes", default=10, type=float,
                   help="Also write checkpoint.pth within an epoch this often, with the position in the epoch: a "
                        "killed run resumes at that batch and loses at most this much work (0 disables).")
    p.add_argument("--fsdp", default=False, type=bool_flag,
                   help="Fully sharded data parallel (FSDP2) instead of DDP, for ViT-L and larger: each process "
                        "holds a shard of the weights and optimizer state; checkpoints keep the ordinary layout.")
    p.add_argument("--seed", default=0, type=int, help="Random seed.")
    p.add_argument("--num_workers", default=10, type=int, help="Data loading processes per GPU.")
    p.add_argument("--gpu_augment", default=False, type=bool_flag,
                   help="Loader workers only decode, crop and flip; colour jitter, grayscale, blur, solarisation "
                        "and normalisation run batched on the training device (needs kornia). Frees the CPUs.")
    p.add_argument("--compile", default=False, type=bool_flag,
                   help="torch.compile the student and teacher backbones (one graph per crop resolution).")
    p.add_argument("--log_every", default=10, type=int,
                   help="Read the loss back from the device every this many steps (progress bar, NaN check).")
    p.add_argument("--log_dir", default=None, type=str,
                   help="Also write TensorBoard scalars here (needs the tensorboard package): loss, lr, weight "
                        "decay, teacher momentum, images/s per step.")
    add_launcher_args(p)
    # Graphcore IPUs only (--device ipu; ignored elsewhere): configurations vit_*_pod*_ipu, see core/ipu.py
    p.add_argument("--ipu_pipeline", default=None, type=int, nargs="+",
                   help="ViT blocks on each IPU of a replica, summing to the depth, e.g. 4 4 4 0 for ViT-S/16 (the "
                        "head's MLP goes on the second-to-last IPU, its output layer on the last); default: one IPU.")
    p.add_argument("--replication_factor", default=1, type=int,
                   help="IPU replicas, each a copy of the pipeline; the global batch is batch_size_per_gpu x "
                        "accum_iter x replication_factor. Under poprun, equal to its --num-replicas.")
    p.add_argument("--device_iterations", default=1, type=int,
                   help="IPU optimizer steps per host call: faster, but lr, momentum and centre advance per call.")
    p.add_argument("--loss_scaling", default=128.0, type=float, help="Static loss scale of fp16 training on IPUs.")
    return p


def build_models(args, device):
    student = build_vit(args.arch, args.patch_size, drop_path_rate=args.drop_path_rate,
                        img_size=args.global_crops_size)
    teacher = build_vit(args.arch, args.patch_size, img_size=args.global_crops_size)
    dim = student.embed_dim
    student = MultiCropWrapper(student, DINOHead(dim, args.out_dim, args.use_bn_in_head, args.norm_last_layer))
    teacher = MultiCropWrapper(teacher, DINOHead(dim, args.out_dim, args.use_bn_in_head))
    student, teacher = student.to(device), teacher.to(device)
    if has_batchnorms(student) and dist.get_world_size() > 1:
        student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = torch.nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


def check_args(args):
    """Nonsensical numbers stop the run with one line before anything starts (a nan --lr, for one, would only show
    up later as a nan loss)."""
    rules = [(name, 0 <= getattr(args, name) < math.inf, "a finite number >= 0")
             for name in ("lr", "min_lr", "weight_decay", "weight_decay_end", "clip_grad")]
    rules += [(name, 0 < getattr(args, name) < math.inf, "a finite number > 0")
              for name in ("warmup_teacher_temp", "teacher_temp")]
    rules += [(name, getattr(args, name) >= 1, "at least 1") for name in
              ("epochs", "batch_size_per_gpu", "accum_iter", "out_dim", "log_every", "patch_size",
               "global_crops_size", "local_crops_size")]
    rules += [(name, getattr(args, name) >= 0, "at least 0") for name in
              ("warmup_epochs", "warmup_teacher_temp_epochs", "freeze_last_layer", "local_crops_number",
               "num_workers", "saveckp_freq", "checkpoint_every_minutes")]
    rules += [("momentum_teacher", 0 <= args.momentum_teacher <= 1, "between 0 and 1"),
              ("drop_path_rate", 0 <= args.drop_path_rate < 1, "in [0, 1)")]
    rules += [(name, 0 < getattr(args, name)[0] <= getattr(args, name)[1] <= 1, "two numbers 0 < min <= max <= 1")
              for name in ("global_crops_scale", "local_crops_scale")]
    for name, ok, rule in rules:
        if not ok:
            value = getattr(args, name)
            value = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            raise UserError(f"--{name} must be {rule}, got {value}: fix the flag or the config")


def main(args):
    check_args(args)
    if args.device == "ipu":  # poptorch compiles the whole step, so IPUs run their own loop (core/ipu.py)
        return ipu.train_dino(args, lambda: build_models(args, torch.device("cpu")))
    device = resolve_device(args.device, dist.world_from_env()[2])
    rank, world_size, _ = dist.init_distributed(device)
    if args.fsdp:
        fsdp.check_fsdp(device, args.knn_every)
    precision = resolve_precision(device, args.precision)
    log = setup_logger()
    output_dir = Path(args.output_dir)
    check_writable(output_dir)
    tb = TensorBoard(args.log_dir)
    if args.gpu_augment:
        require_kornia()
    # One seed for every process (as the original), so that student and teacher start identical everywhere;
    # augmentations are seeded per image by the dataset instead.
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)

    data_path = Path(args.data_path) if args.data_path else ensure_default_data() / "train"
    # With --gpu_augment the workers stop after the crops and flips, and the rest runs batched on the device.
    transform = DataAugmentationDINO(args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
                                     args.global_crops_size, args.local_crops_size, photometric=not args.gpu_augment)
    gpu_augment = None
    if args.gpu_augment:
        gpu_augment = GPUAugmentDINO(transform.views, transform.sigma_scale, args.seed, args.batch_size_per_gpu,
                                     rank, world_size)
    dataset = ImageDataset(data_path, transform, seed=args.seed)
    global_batch = args.batch_size_per_gpu * world_size
    steps_per_epoch = len(dataset) // global_batch // args.accum_iter
    if steps_per_epoch == 0:
        raise UserError(f"{data_path} has {len(dataset)} images, fewer than one optimizer step "
                        f"({global_batch * args.accum_iter}): lower --batch_size_per_gpu or --accum_iter")
    loader = build_loader(dataset, args.batch_size_per_gpu, args.num_workers, seed=args.seed)
    log.info(f"data: {len(dataset)} images from {data_path}, {steps_per_epoch} steps per epoch; "
             f"device {device}, precision {precision}, {world_size} process(es)")
    knn_monitor = build_knn_monitor(args, args.global_crops_size, args.batch_size_per_gpu)

    student, teacher = build_models(args, device)
    if args.compile:
        compile_backbones(student, teacher)
    compile_for(device, student)
    compile_for(device, teacher)
    if args.fsdp:  # every process holds a shard of each weight; the teacher is cut alike, so the EMA runs on shards
        student_ddp, teacher = fsdp.shard(student), fsdp.shard(teacher)
    else:
        student_ddp = dist.maybe_ddp(student, device)
    dino_loss = DINOLoss(args.out_dim, args.local_crops_number + 2, args.warmup_teacher_temp, args.teacher_temp,
                         args.warmup_teacher_temp_epochs, args.epochs).to(device)
    optimizer = build_optimizer(args.optimizer, param_groups(student), device)
    scaler = make_grad_scaler(device, precision)

    effective_batch = global_batch * args.accum_iter
    schedules = {
        "lr": cosine_schedule(args.lr * effective_batch / 256.0, args.min_lr, args.epochs, steps_per_epoch,
                              args.warmup_epochs),
        "wd": cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, steps_per_epoch),
        "momentum": cosine_schedule(args.momentum_teacher, 1.0, args.epochs, steps_per_epoch),
    }

    def checkpoint(epoch, **position):
        """The state that resumes at `epoch` (after `position` within it), in the official single-process layout
        whether sharded or not. Every process calls it: the RNG states are gathered, shards consolidated."""
        state = {
            "student": {f"module.{k}": v for k, v in fsdp.model_state(student).items()},
            "teacher": fsdp.model_state(teacher),
            "optimizer": fsdp.optimizer_state(student, optimizer),
            "epoch": epoch,
            "args": vars(args),
            "dino_loss": dino_loss.state_dict(),
            "rng": dist.all_gather_objects(rng_state()),
            **position,
        }
        if scaler is not None:
            state["fp16_scaler"] = scaler.state_dict()
        return state

    ckpt_path = output_dir / "checkpoint.pth"
    run = restart_from_checkpoint(ckpt_path, {"epoch": 0, "epoch_step": 0, "epoch_totals": None},
                                  student=fsdp.Resumable(student), teacher=fsdp.Resumable(teacher),
                                  optimizer=fsdp.Resumable(student, optimizer), fp16_scaler=scaler, dino_loss=dino_loss)
    start_epoch = run["epoch"]
    if start_epoch or run["epoch_step"]:
        log.info(f"resumed from {ckpt_path} at epoch {start_epoch}, step {run['epoch_step']}")
    mid_epoch = MidEpochCheckpoints(ckpt_path, args.checkpoint_every_minutes, steps_per_epoch, checkpoint)
    mid_epoch.resume(run)

    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        stats = train_one_epoch(student_ddp, student, teacher, dino_loss, loader, optimizer, scaler, schedules,
                                epoch, steps_per_epoch, device, precision, args, ckpt_path, tb, gpu_augment, mid_epoch)
        knn = {}
        if knn_monitor is not None and knn_monitor.due(epoch):
            knn["knn_top1"] = knn_monitor(teacher.backbone, device, precision)
        save = checkpoint(epoch + 1)
        if dist.is_main_process():
            save_checkpoint(save, ckpt_path)
            if args.saveckp_freq and epoch % args.saveckp_freq == 0:
                save_checkpoint(save, output_dir / f"checkpoint{epoch:04}.pth")
            append_json_line(output_dir / "log.txt", {**{f"train_{k}": v for k, v in stats.items()}, **knn,
                                                      "epoch": epoch})
        mid_epoch.restart()
        tb.add(epoch, knn)
        tb.flush()
        log.info(f"epoch {epoch}: " + ", ".join(f"{k} {v:.6g}" for k, v in stats.items()))
    tb.close()
    dist.barrier()
    dist.cleanup()
    return output_dir


def clip_and_freeze(student, epoch, args):
    """DINO's gradient surgery between backward and step: per-parameter clipping, then the frozen output layer."""
    if args.clip_grad:
        clip_gradients(student, args.clip_grad)
    cancel_gradients_last_layer(epoch, student, args.freeze_last_layer)


def train_one_epoch(student_ddp, student, teacher, dino_loss, loader, optimizer, scaler, schedules, epoch,
                    steps_per_epoch, device, precision, args, ckpt_path, tb, gpu_augment, mid_epoch):
    student_ddp.train()
    progress = Progress(steps_per_epoch, epoch, args.batch_size_per_gpu * args.accum_iter)
    # The loss stays on the device and is read every --log_every steps, so no step waits for the device.
    losses = LossWatch(epoch, ckpt_path, "Lower --lr, clip gradients or use fp32/bf16")
    start_step, totals = mid_epoch.start()  # a run resumed mid-epoch goes on from there with the epoch's sums
    losses.total, losses.count = totals.get("loss", 0.0), totals.get("count", 0)
    batches = MicroBatches(loader, steps_per_epoch, args.accum_iter, epoch, start_step, totals.get("n_bad", 0))
    try:  # the bar is closed before any error is printed, so the message gets a line of its own
        for it, first_micro, last_micro, (crops, _) in batches:
            if first_micro:
                micro = 0
                for group in optimizer.param_groups:
                    group["lr"] = float(schedules["lr"][it])
                    if group["apply_wd"]:
                        group["weight_decay"] = float(schedules["wd"][it])
            crops = [c.to(device, non_blocking=True) for c in crops]
            if gpu_augment is not None:
                crops = gpu_augment(crops, it, micro)
            micro += 1
            with dist.sync_unless(student_ddp, last_micro):
                with autocast(device, precision):
                    with torch.no_grad():
                        teacher_output = teacher(crops[:2])
                    student_output = student_ddp(crops)
                    loss = dino_loss(student_output, teacher_output, epoch)
                losses.add(it, loss)
                loss = loss / args.accum_iter
                (scaler.scale(loss) if scaler else loss).backward()
                step_boundary(device)
            if not last_micro:
                continue
            apply_gradients(optimizer, scaler, lambda: clip_and_freeze(student, epoch, args))
            ema_update(teacher, student, float(schedules["momentum"][it]))
            dino_loss.update_center()
            step_boundary(device)
            loss_value = losses.read() if (it + 1) % args.log_every == 0 else None
            if loss_value is not None:  # the device has just been waited for: a free moment to checkpoint
                mid_epoch.save_if_due(it, {"loss": losses.total, "count": losses.count, "n_bad": batches.n_bad},
                                      device)
            images_per_s = progress.step(loss=f"{losses.last:.4f}" if losses.last is not None else "-",
                                         lr=f"{schedules['lr'][it]:.2e}", wd=f"{schedules['wd'][it]:.3f}",
                                         mom=f"{schedules['momentum'][it]:.4f}")
            tb.add(epoch_1000x(it, steps_per_epoch, args.accum_iter),
                   {"train_loss": None if loss_value is None else tb.mean(loss_value, device),
                    "lr": float(schedules["lr"][it]), "wd": float(schedules["wd"][it]),
                    "teacher_momentum": float(schedules["momentum"][it]), "images_per_s": images_per_s})
        losses.read()
    finally:
        progress.close()
    loss, n_bad = epoch_totals(losses.total, losses.count, batches.n_bad, device, epoch)
    last_it = (epoch + 1) * steps_per_epoch - 1
    return {"loss": loss, "lr": float(schedules["lr"][last_it]), "wd": float(schedules["wd"][last_it]),
            "skipped_images": n_bad}


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(get_args_parser(), "main_dino")))
