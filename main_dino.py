"""DINO self-supervised pretraining (Caron et al., 2021): a student ViT learns to match a momentum teacher across
multi-crop views. Defaults are the official facebookresearch/dino recipe; `--config NAME` picks one from configs.yml.

    python main_dino.py --data_path /path/to/images --output_dir runs/dino      # one process
    torchrun --nproc_per_node 8 main_dino.py --config vit_small_pod16 ...      # many
"""
import argparse
import random
from pathlib import Path

import numpy as np
import torch

from core import distributed as dist
from core.augment import DataAugmentationDINO
from core.checkpoint import check_writable, restart_from_checkpoint, rng_state, save_checkpoint
from core.config import bool_flag, parse_args
from core.data import ImageDataset, MicroBatches, build_loader
from core.device import autocast, make_grad_scaler, resolve_device, resolve_precision
from core.dino import (DINOHead, DINOLoss, MultiCropWrapper, cancel_gradients_last_layer, clip_gradients, ema_update,
                       has_batchnorms)
from core.errors import UserError, run_cli
from core.log import Progress, append_json_line, check_finite, epoch_totals, setup_logger
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
                   help="Mixed precision: auto is fp16 with loss scaling on CUDA (the recipe's use_fp16), fp32 on "
                        "CPU.")
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
    # Misc
    p.add_argument("--data_path", default=None, type=str,
                   help="ImageFolder tree or flat folder of images; omitted: the embedded generated data set.")
    p.add_argument("--output_dir", default=".", type=str,
                   help="Where checkpoints and log.txt go; a run restarted here resumes where it stopped.")
    p.add_argument("--saveckp_freq", default=20, type=int, help="Keep checkpointNNNN.pth every this many epochs.")
    p.add_argument("--seed", default=0, type=int, help="Random seed.")
    p.add_argument("--num_workers", default=10, type=int, help="Data loading processes per GPU.")
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


def main(args):
    device = resolve_device(args.device, dist.world_from_env()[2])
    _, world_size, _ = dist.init_distributed(device)
    precision = resolve_precision(device, args.precision)
    log = setup_logger()
    output_dir = Path(args.output_dir)
    check_writable(output_dir)
    if args.accum_iter < 1:
        raise UserError(f"--accum_iter must be at least 1, got {args.accum_iter}")
    # One seed for every process (as the original), so that student and teacher start identical everywhere;
    # augmentations are seeded per image by the dataset instead.
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)

    data_path = Path(args.data_path) if args.data_path else ensure_default_data() / "train"
    transform = DataAugmentationDINO(args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
                                     args.global_crops_size, args.local_crops_size)
    dataset = ImageDataset(data_path, transform, seed=args.seed)
    global_batch = args.batch_size_per_gpu * world_size
    steps_per_epoch = len(dataset) // global_batch // args.accum_iter
    if steps_per_epoch == 0:
        raise UserError(f"{data_path} has {len(dataset)} images, fewer than one optimizer step "
                        f"({global_batch * args.accum_iter}): lower --batch_size_per_gpu or --accum_iter")
    loader = build_loader(dataset, args.batch_size_per_gpu, args.num_workers, seed=args.seed)
    log.info(f"data: {len(dataset)} images from {data_path}, {steps_per_epoch} steps per epoch; "
             f"device {device}, precision {precision}, {world_size} process(es)")

    student, teacher = build_models(args, device)
    student_ddp = dist.maybe_ddp(student, device)
    dino_loss = DINOLoss(args.out_dim, args.local_crops_number + 2, args.warmup_teacher_temp, args.teacher_temp,
                         args.warmup_teacher_temp_epochs, args.epochs).to(device)
    optimizer = build_optimizer(args.optimizer, param_groups(student))
    scaler = make_grad_scaler(device, precision)

    effective_batch = global_batch * args.accum_iter
    schedules = {
        "lr": cosine_schedule(args.lr * effective_batch / 256.0, args.min_lr, args.epochs, steps_per_epoch,
                              args.warmup_epochs),
        "wd": cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, steps_per_epoch),
        "momentum": cosine_schedule(args.momentum_teacher, 1.0, args.epochs, steps_per_epoch),
    }
    ckpt_path = output_dir / "checkpoint.pth"
    start_epoch = restart_from_checkpoint(ckpt_path, {"epoch": 0}, student=student, teacher=teacher,
                                          optimizer=optimizer, fp16_scaler=scaler, dino_loss=dino_loss)["epoch"]
    if start_epoch:
        log.info(f"resumed from {ckpt_path} at epoch {start_epoch}")

    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        stats = train_one_epoch(student_ddp, student, teacher, dino_loss, loader, optimizer, scaler, schedules,
                                epoch, steps_per_epoch, device, precision, args, ckpt_path)
        save = {
            "student": {f"module.{k}": v for k, v in student.state_dict().items()},
            "teacher": teacher.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch + 1,
            "args": vars(args),
            "dino_loss": dino_loss.state_dict(),
            "rng": dist.all_gather_objects(rng_state()),
        }
        if scaler is not None:
            save["fp16_scaler"] = scaler.state_dict()
        if dist.is_main_process():
            save_checkpoint(save, ckpt_path)
            if args.saveckp_freq and epoch % args.saveckp_freq == 0:
                save_checkpoint(save, output_dir / f"checkpoint{epoch:04}.pth")
            append_json_line(output_dir / "log.txt", {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch})
        log.info(f"epoch {epoch}: " + ", ".join(f"{k} {v:.6g}" for k, v in stats.items()))
    dist.barrier()
    dist.cleanup()
    return output_dir


def clip_and_freeze(student, epoch, args):
    """DINO's gradient surgery between backward and step: per-parameter clipping, then the frozen output layer."""
    if args.clip_grad:
        clip_gradients(student, args.clip_grad)
    cancel_gradients_last_layer(epoch, student, args.freeze_last_layer)


def train_one_epoch(student_ddp, student, teacher, dino_loss, loader, optimizer, scaler, schedules, epoch,
                    steps_per_epoch, device, precision, args, ckpt_path):
    student_ddp.train()
    total_loss, n_loss = 0.0, 0
    progress = Progress(steps_per_epoch, epoch, args.batch_size_per_gpu * args.accum_iter)
    batches = MicroBatches(loader, steps_per_epoch, args.accum_iter, epoch)
    for it, first_micro, last_micro, (crops, _) in batches:
        if first_micro:
            for group in optimizer.param_groups:
                group["lr"] = float(schedules["lr"][it])
                if group["apply_wd"]:
                    group["weight_decay"] = float(schedules["wd"][it])
        crops = [c.to(device, non_blocking=True) for c in crops]
        with dist.sync_unless(student_ddp, last_micro):
            with autocast(device, precision):
                with torch.no_grad():
                    teacher_output = teacher(crops[:2])
                student_output = student_ddp(crops)
                loss = dino_loss(student_output, teacher_output, epoch)
            loss_value = loss.item()
            check_finite(loss_value, it, epoch, ckpt_path, "Lower --lr, clip gradients or use fp32/bf16")
            loss = loss / args.accum_iter
            (scaler.scale(loss) if scaler else loss).backward()
        total_loss += loss_value
        n_loss += 1
        if not last_micro:
            continue
        apply_gradients(optimizer, scaler, lambda: clip_and_freeze(student, epoch, args))
        ema_update(teacher, student, float(schedules["momentum"][it]))
        dino_loss.update_center()
        progress.step(loss=f"{loss_value:.4f}", lr=f"{schedules['lr'][it]:.2e}", wd=f"{schedules['wd'][it]:.3f}",
                      mom=f"{schedules['momentum'][it]:.4f}")
    progress.close()
    loss, n_bad = epoch_totals(total_loss, n_loss, batches.n_bad, device, epoch)
    last_it = (epoch + 1) * steps_per_epoch - 1
    return {"loss": loss, "lr": float(schedules["lr"][last_it]), "wd": float(schedules["wd"][last_it]),
            "skipped_images": n_bad}


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(get_args_parser(), "main_dino")))
