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
from core import fsdp
from core.checkpoint import MidEpochCheckpoints, check_writable, resume_run, rng_state, save_checkpoint
from core.config import MAE_MODELS, add_mae_launcher_args, parse_args
from core.data import ImageDataset, MicroBatches, build_loader
from core.device import (autocast, compile_for, make_grad_scaler, resolve_device, resolve_precision,
                         step_boundary)
from core.errors import UserError, run_cli
from core.knn import add_monitor_args, build_knn_monitor
from core.log import Progress, TensorBoard, append_json_line, check_finite, epoch_1000x, epoch_totals, setup_logger
from core.mae import WithMaskNoise, build_mae, check_mask_ratio, sample_images, save_reconstruction
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
    p.add_argument("--model", default=None, type=str,
                   help=f"The original's model name ({', '.join(MAE_MODELS)}); sets --arch, --patch_size, the "
                        f"size overrides and the decoder flags.")
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
                   help="Mixed precision: auto is bf16 on CUDA (fp16 with loss scaling without bf16), fp32 on CPU.")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "hpu", "ipu"],
                   help="auto picks CUDA when present, else CPU.")
    # k-NN monitor: --knn_every, --knn_data_path, --knn_max_train
    add_monitor_args(p)
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
    p.add_argument("--checkpoint_every_minutes", default=10, type=float,
                   help="Also write checkpoint.pth within an epoch this often, with the position in the epoch: a "
                        "killed run resumes at that batch and loses at most this much work (0 disables).")
    p.add_argument("--fsdp", action="store_true",
                   help="Fully sharded data parallel (FSDP2) instead of DDP, for ViT-L and larger: each process "
                        "holds a shard of the weights and optimizer state; checkpoints keep the ordinary layout.")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--resume", default="", type=str,
                   help="Start from this checkpoint (model; optimizer, scaler and epoch when it has them) unless "
                        "OUTPUT_DIR/checkpoint.pth exists, which a restarted run always resumes from.")
    p.add_argument("--start_epoch", default=0, type=int, help="First epoch of a run not resumed from a checkpoint.")
    p.add_argument("--num_workers", default=10, type=int, help="Data loading processes per device.")
    p.add_argument("--pin_mem", action="store_true", default=True,
                   help="Pin CPU memory in the data loader for faster copies to the GPU (default; CUDA only).")
    p.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    p.add_argument("--log_dir", default=None, type=str,
                   help="Also write TensorBoard scalars here (train_loss and lr per step, as the original); needs "
                        "the tensorboard package. The original writes to ./output_dir by default, ours only when "
                        "asked.")
    add_mae_launcher_args(p)
    return p


def check_args(args):
    check_mask_ratio(args.mask_ratio)
    if args.accum_iter < 1:
        raise UserError(f"--accum_iter must be at least 1, got {args.accum_iter}")
    if not args.checkpoint_every_minutes >= 0:
        raise UserError(f"--checkpoint_every_minutes must be a number >= 0 (0 disables), got "
                        f"{args.checkpoint_every_minutes}")


def is_due(epoch, freq, epochs):
    return epoch + 1 == epochs or (freq > 0 and epoch % freq == 0)


def main(args):
    if args.device == "ipu":
        raise UserError("MAE has no IPU training step (DINO has one: main_dino.py --device ipu): use --device cuda, "
                        "hpu or cpu")
    device = resolve_device(args.device, dist.world_from_env()[2])
    rank, world_size, _ = dist.init_distributed(device)
    precision = resolve_precision(device, args.precision)
    log = setup_logger()
    check_args(args)
    if args.fsdp:
        fsdp.check_fsdp(device, args.knn_every)
    output_dir = Path(args.output_dir)
    if dist.is_main_process():  # rank 0 does all writing; ranks probing at once would race on one file
        check_writable(output_dir)
    tb = TensorBoard(args.log_dir)
    # One seed for every process, so that the weights start identical everywhere (sharded models are not
    # broadcast); the masks are drawn per image by the dataset instead, as the original draws them per process.
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)

    model = build_mae(args.arch, args.patch_size, args.input_size, args.embed_dim, args.depth, args.num_heads,
                      decoder_embed_dim=args.decoder_embed_dim, decoder_depth=args.decoder_depth,
                      decoder_num_heads=args.decoder_num_heads, norm_pix_loss=args.norm_pix_loss).to(device)
    data_path = Path(args.data_path) if args.data_path else ensure_default_data() / "train"
    transform = WithMaskNoise(mae_pretrain_transform(args.input_size), model.patch_embed.num_patches)
    dataset = ImageDataset(data_path, transform, seed=args.seed)
    global_batch = args.batch_size * world_size
    steps_per_epoch = len(dataset) // global_batch // args.accum_iter
    if steps_per_epoch == 0:
        raise UserError(f"{data_path} has {len(dataset)} images, fewer than one optimizer step "
                        f"({global_batch * args.accum_iter}): lower --batch_size or --accum_iter")
    loader = build_loader(dataset, args.batch_size, args.num_workers, seed=args.seed, pin_memory=args.pin_mem)
    recon_images = None
    if args.recon_freq and (dist.is_main_process() or args.fsdp):  # a sharded forward needs every process
        recon_images = sample_images(data_path, args.input_size, args.recon_images)

    compile_for(device, model)
    model_ddp = fsdp.shard(model) if args.fsdp else dist.maybe_ddp(model, device)
    optimizer = build_optimizer("adamw", param_groups(model), device, betas=(0.9, 0.95))
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
    knn_monitor = build_knn_monitor(args, args.input_size, args.batch_size)


    def checkpoint(epoch, **position):
        """The state after `epoch` (the last finished one, as the original counts; `position` within the next one),
        in the single-process layout whether sharded or not. Every process calls it: RNG states are gathered."""
        return {"model": fsdp.model_state(model), "optimizer": fsdp.optimizer_state(model, optimizer),
                "epoch": epoch, "scaler": scaler.state_dict() if scaler is not None else {}, "args": vars(args),
                "rng": dist.all_gather_objects(rng_state()), **position}

    ckpt_path = output_dir / "checkpoint.pth"
    resumed, run = resume_run(output_dir, args.resume, {"epoch": args.start_epoch - 1, "epoch_step": 0,
                                                        "epoch_totals": None},
                              model=fsdp.Resumable(model), optimizer=fsdp.Resumable(model, optimizer), scaler=scaler)
    start_epoch = run["epoch"] + 1
    if resumed:
        log.info(f"resumed from {resumed} at epoch {start_epoch}, step {run['epoch_step']}")
    mid_epoch = MidEpochCheckpoints(ckpt_path, args.checkpoint_every_minutes, steps_per_epoch,
                                    lambda epoch, **position: checkpoint(epoch - 1, **position))
    mid_epoch.resume(run)
    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        stats = train_one_epoch(model_ddp, model, loader, optimizer, scaler, lr_schedule, epoch, steps_per_epoch,
                                device, precision, args, ckpt_path, tb, mid_epoch)
        knn = {}
        if knn_monitor is not None and knn_monitor.due(epoch):  # the encoder's [CLS], as eval_knn.py reads it
            knn["knn_top1"] = knn_monitor(model, device, precision,
                                          lambda x: model.forward_features(x, cls_only=True)[:, 0])
        save = checkpoint(epoch)
        if dist.is_main_process():
            save_checkpoint(save, ckpt_path)
            if is_due(epoch, args.saveckp_freq, args.epochs):
                save_checkpoint(save, output_dir / f"checkpoint-{epoch}.pth")
            append_json_line(output_dir / "log.txt", {**{f"train_{k}": v for k, v in stats.items()}, **knn,
                                                      "epoch": epoch})
        mid_epoch.restart()
        if recon_images is not None and is_due(epoch, args.recon_freq, args.epochs):
            recon = output_dir / f"reconstruction-{epoch}.png" if dist.is_main_process() else None
            save_reconstruction(model, recon_images.to(device), recon, args.mask_ratio, seed=args.seed)
        tb.add(epoch, knn)
        tb.flush()
        log.info(f"epoch {epoch}: " + ", ".join(f"{k} {v:.6g}" for k, v in stats.items()))
    tb.close()
    dist.barrier()
    dist.cleanup()
    return output_dir


def train_one_epoch(model_ddp, model, loader, optimizer, scaler, lr_schedule, epoch, steps_per_epoch, device,
                    precision, args, ckpt_path, tb, mid_epoch):
    model_ddp.train()
    start_step, totals = mid_epoch.start()  # a run resumed mid-epoch goes on from there with the epoch's sums
    total_loss, n_loss = totals.get("loss", 0.0), totals.get("count", 0)
    progress = Progress(steps_per_epoch, epoch, args.batch_size * args.accum_iter)
    batches = MicroBatches(loader, steps_per_epoch, args.accum_iter, epoch, start_step, totals.get("n_bad", 0))
    for it, first_micro, last_micro, ((imgs, noise), _) in batches:
        if first_micro:
            set_lr(optimizer, lr_schedule[it])
        with dist.sync_unless(model_ddp, last_micro):
            with autocast(device, precision):
                loss = model_ddp(imgs.to(device, non_blocking=True), args.mask_ratio,
                                 noise.to(device, non_blocking=True))[0]
            loss_value = loss.item()
            check_finite(loss_value, it, epoch, ckpt_path, "Lower --blr or use fp32/bf16")
            loss = loss / args.accum_iter
            (scaler.scale(loss) if scaler else loss).backward()
            step_boundary(device)
        total_loss += loss_value
        n_loss += 1
        if not last_micro:
            continue
        apply_gradients(optimizer, scaler)
        step_boundary(device)
        images_per_s = progress.step(loss=f"{loss_value:.4f}", lr=f"{lr_schedule[it]:.2e}")
        tb.add(epoch_1000x(it, steps_per_epoch, args.accum_iter), {"train_loss": tb.mean(loss_value, device),
                                                                   "lr": float(lr_schedule[it]),
                                                                   "images_per_s": images_per_s})
        mid_epoch.save_if_due(it, {"loss": total_loss, "count": n_loss, "n_bad": batches.n_bad}, device)
    progress.close()
    loss, n_bad = epoch_totals(total_loss, n_loss, batches.n_bad, device, epoch)
    return {"loss": loss, "lr": float(lr_schedule[(epoch + 1) * steps_per_epoch - 1]), "skipped_images": n_bad}


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(get_args_parser(), "main_pretrain_mae")))
