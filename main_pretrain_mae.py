"""Masked autoencoder pretraining (He et al., 2022): a ViT encoder sees 25% of the patches and a light decoder
reconstructs the pixels of the rest. Defaults are the published facebookresearch/mae recipe; `--config NAME` picks one
from configs.yml (section main_pretrain_mae).

    python main_pretrain_mae.py --config demo --output_dir runs/mae_demo          # CPU, embedded data
    torchrun --nproc_per_node 8 main_pretrain_mae.py --config mae_base_pod16 --data_path /imagenet/train ...
"""
import argparse
import random
from pathlib import Path

import numpy as np
import torch

from core import distributed as dist
from core.augment import mae_pretrain_transform
from core.checkpoint import check_writable, restart_from_checkpoint, rng_state, save_checkpoint
from core.config import parse_args
from core.data import ImageDataset, MicroBatches, build_loader
from core.device import autocast, make_grad_scaler, resolve_device, resolve_precision
from core.errors import UserError, run_cli
from core.log import Progress, append_json_line, check_finite, epoch_totals, setup_logger
from core.mae import build_mae, check_mask_ratio, sample_images, save_reconstruction
from core.optim import apply_gradients, build_optimizer, param_groups, set_lr
from core.schedule import cosine_schedule
from core.synthetic import ensure_default_data
from core.vision_transformer import ARCHS


def get_args_parser():
    p = argparse.ArgumentParser("MAE pretraining", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, type=str,
                   help="Named configuration from configs.yml (section main_pretrain_mae) or a YAML file.")
    p.add_argument("--batch_size", default=64, type=int,
                   help="Images per process and micro-batch; effective batch = batch_size x accum_iter x processes.")
    p.add_argument("--epochs", default=400, type=int)
    p.add_argument("--accum_iter", default=1, type=int,
                   help="Micro-batches accumulated per optimizer step, to reach a large batch on few devices.")
    # Model
    p.add_argument("--arch", default="vit_large", choices=ARCHS, help="Encoder size (official default: ViT-L).")
    p.add_argument("--patch_size", default=16, type=int, help="Patch size in pixels.")
    p.add_argument("--embed_dim", default=None, type=int, help="Override the arch's width (small CPU models).")
    p.add_argument("--depth", default=None, type=int, help="Override the arch's number of blocks.")
    p.add_argument("--num_heads", default=None, type=int, help="Override the arch's number of heads.")
    p.add_argument("--input_size", default=224, type=int, help="Image side in pixels.")
    p.add_argument("--mask_ratio", default=0.75, type=float, help="Fraction of patches removed, in (0, 1).")
    p.add_argument("--norm_pix_loss", action="store_true",
                   help="Predict per-patch normalised pixels (better representations, the published recipe).")
    p.add_argument("--decoder_embed_dim", default=512, type=int, help="Decoder width.")
    p.add_argument("--decoder_depth", default=8, type=int, help="Decoder blocks.")
    p.add_argument("--decoder_num_heads", default=16, type=int, help="Decoder heads.")
    # Optimisation
    p.add_argument("--weight_decay", default=0.05, type=float, help="AdamW weight decay (not on biases and norms).")
    p.add_argument("--lr", default=None, type=float, help="Absolute peak learning rate; default blr x batch / 256.")
    p.add_argument("--blr", default=1.5e-4, type=float,
                   help="Base learning rate: lr = blr x effective batch / 256.")
    p.add_argument("--min_lr", default=0.0, type=float, help="Final learning rate of the cosine schedule.")
    p.add_argument("--warmup_epochs", default=40, type=int, help="Epochs of linear learning-rate warm-up.")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="Mixed precision: auto is fp16 with loss scaling on CUDA and fp32 on CPU.")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "hpu", "ipu"],
                   help="auto picks CUDA when present, else CPU.")
    # Misc
    p.add_argument("--data_path", default=None, type=str,
                   help="ImageFolder tree or flat folder of images; omitted: the embedded generated data set.")
    p.add_argument("--output_dir", default="./output_dir", type=str,
                   help="Where checkpoints, log.txt and reconstructions go; a run restarted here resumes.")
    p.add_argument("--saveckp_freq", default=20, type=int,
                   help="Keep checkpoint-EPOCH.pth every this many epochs and at the last (0: only the last).")
    p.add_argument("--recon_freq", default=20, type=int,
                   help="Write reconstruction-EPOCH.png every this many epochs and at the last (0: never).")
    p.add_argument("--recon_images", default=8, type=int, help="Images in each reconstruction picture.")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--num_workers", default=10, type=int, help="Data loading processes per device.")
    return p


def check_args(args):
    check_mask_ratio(args.mask_ratio)
    if args.accum_iter < 1:
        raise UserError(f"--accum_iter must be at least 1, got {args.accum_iter}")


def is_due(epoch, freq, epochs):
    return epoch + 1 == epochs or (freq > 0 and epoch % freq == 0)


def main(args):
    device = resolve_device(args.device, dist.world_from_env()[2])
    rank, world_size, _ = dist.init_distributed(device)
    precision = resolve_precision(device, args.precision)
    log = setup_logger()
    check_args(args)
    output_dir = Path(args.output_dir)
    if dist.is_main_process():  # rank 0 does all writing; ranks probing at once would race on one file
        check_writable(output_dir)
    # Per-process seeds, as the original: each process draws its own masks; DDP copies rank 0's initial weights.
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    random.seed(args.seed + rank)

    model = build_mae(args.arch, args.patch_size, args.input_size, args.embed_dim, args.depth, args.num_heads,
                      decoder_embed_dim=args.decoder_embed_dim, decoder_depth=args.decoder_depth,
                      decoder_num_heads=args.decoder_num_heads, norm_pix_loss=args.norm_pix_loss).to(device)
    data_path = Path(args.data_path) if args.data_path else ensure_default_data() / "train"
    dataset = ImageDataset(data_path, mae_pretrain_transform(args.input_size), seed=args.seed)
    global_batch = args.batch_size * world_size
    steps_per_epoch = len(dataset) // global_batch // args.accum_iter
    if steps_per_epoch == 0:
        raise UserError(f"{data_path} has {len(dataset)} images, fewer than one optimizer step "
                        f"({global_batch * args.accum_iter}): lower --batch_size or --accum_iter")
    loader = build_loader(dataset, args.batch_size, args.num_workers, seed=args.seed)
    recon_images = None
    if args.recon_freq and dist.is_main_process():
        recon_images = sample_images(data_path, args.input_size, args.recon_images)

    model_ddp = dist.maybe_ddp(model, device)
    optimizer = build_optimizer("adamw", param_groups(model), betas=(0.9, 0.95))
    for group in optimizer.param_groups:
        group["weight_decay"] = args.weight_decay if group["apply_wd"] else 0.0
    scaler = make_grad_scaler(device, precision)
    effective_batch = global_batch * args.accum_iter
    lr = args.lr if args.lr is not None else args.blr * effective_batch / 256
    lr_schedule = cosine_schedule(lr, args.min_lr, args.epochs, steps_per_epoch, args.warmup_epochs,
                                  warmup_endpoint=False)
    log.info(f"data: {len(dataset)} images from {data_path}, {steps_per_epoch} steps per epoch of "
             f"{effective_batch} images; lr {lr:.3g}; device {device}, precision {precision}, "
             f"{world_size} process(es)")

    ckpt_path = output_dir / "checkpoint.pth"
    start_epoch = restart_from_checkpoint(ckpt_path, {"epoch": -1}, model=model, optimizer=optimizer,
                                          scaler=scaler)["epoch"] + 1
    if start_epoch:
        log.info(f"resumed from {ckpt_path} at epoch {start_epoch}")
    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        stats = train_one_epoch(model_ddp, model, loader, optimizer, scaler, lr_schedule, epoch, steps_per_epoch,
                                device, precision, args, ckpt_path)
        save = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "scaler": scaler.state_dict() if scaler is not None else {}, "args": vars(args),
                "rng": dist.all_gather_objects(rng_state())}
        if dist.is_main_process():
            save_checkpoint(save, ckpt_path)
            if is_due(epoch, args.saveckp_freq, args.epochs):
                save_checkpoint(save, output_dir / f"checkpoint-{epoch}.pth")
            if recon_images is not None and is_due(epoch, args.recon_freq, args.epochs):
                save_reconstruction(model, recon_images.to(device), output_dir / f"reconstruction-{epoch}.png",
                                    args.mask_ratio, seed=args.seed)
            append_json_line(output_dir / "log.txt", {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch})
        log.info(f"epoch {epoch}: " + ", ".join(f"{k} {v:.6g}" for k, v in stats.items()))
    dist.barrier()
    dist.cleanup()
    return output_dir


def train_one_epoch(model_ddp, model, loader, optimizer, scaler, lr_schedule, epoch, steps_per_epoch, device,
                    precision, args, ckpt_path):
    model_ddp.train()
    total_loss, n_loss = 0.0, 0
    progress = Progress(steps_per_epoch, epoch, args.batch_size * args.accum_iter)
    batches = MicroBatches(loader, steps_per_epoch, args.accum_iter, epoch)
    for it, first_micro, last_micro, (imgs, _) in batches:
        if first_micro:
            set_lr(optimizer, lr_schedule[it])
        with dist.sync_unless(model_ddp, last_micro):
            with autocast(device, precision):
                loss = model_ddp(imgs.to(device, non_blocking=True), args.mask_ratio)[0]
            loss_value = loss.item()
            check_finite(loss_value, it, epoch, ckpt_path, "Lower --blr or use fp32/bf16")
            loss = loss / args.accum_iter
            (scaler.scale(loss) if scaler else loss).backward()
        total_loss += loss_value
        n_loss += 1
        if not last_micro:
            continue
        apply_gradients(optimizer, scaler)
        progress.step(loss=f"{loss_value:.4f}", lr=f"{lr_schedule[it]:.2e}")
    progress.close()
    loss, n_bad = epoch_totals(total_loss, n_loss, batches.n_bad, device, epoch)
    return {"loss": loss, "lr": float(lr_schedule[(epoch + 1) * steps_per_epoch - 1]), "skipped_images": n_bad}


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(get_args_parser(), "main_pretrain_mae")))
