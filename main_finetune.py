"""Supervised fine-tuning (or training from scratch) of a ViT classifier with the published MAE recipe: layer-wise lr
decay, drop path, RandAugment, mixup/cutmix, label smoothing, random erasing. `--finetune` takes our DINO or MAE
checkpoints, official MAE/DINO files or timm state dicts; `--eval` reports top-1/top-5 of a checkpoint.

    python main_finetune.py --config demo --output_dir runs/finetune_demo           # CPU, embedded data
    torchrun --nproc_per_node 8 main_finetune.py --config b16_imagenet1k --finetune mae_pretrain_vit_base.pth \\
        --data_path /imagenet --output_dir runs/ft_b16                               # train/ and val/ folders
"""
import argparse
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from core import distributed as dist
from core.augment import eval_resize, eval_transform, finetune_transform
from core.checkpoint import (MidEpochCheckpoints, check_state_dict, check_writable, extract_backbone, load_file,
                             read_backbone, resume_run, rng_state, save_checkpoint, use_source_norm_eps)
from core.config import VIT_MODELS, add_mae_launcher_args, parse_args
from core.data import ImageDataset, MicroBatches, build_loader
from core.device import autocast, make_grad_scaler, resolve_device, resolve_precision
from core.errors import UserError, run_cli
from core.log import Progress, TensorBoard, append_json_line, check_finite, epoch_1000x, epoch_totals, setup_logger
from core.mae import is_decoder_key
from core.optim import apply_gradients, build_optimizer, param_groups_layer_decay, set_lr
from core.schedule import cosine_schedule
from core.synthetic import ensure_default_data
from core.vision_transformer import ARCHS, VisionTransformer, arch_sizes, check_image_size, resample_pos_embed

HEAD_INIT_STD = 2e-5  # MAE's manual init of the new classifier (0.01 for linear probing)


def get_args_parser():
    p = argparse.ArgumentParser("Fine-tuning", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, type=str,
                   help="Named configuration from configs.yml (section main_finetune) or a YAML file.")
    p.add_argument("--batch_size", default=64, type=int,
                   help="Images per process and micro-batch; effective batch = batch_size x accum_iter x processes.")
    p.add_argument("--epochs", default=50, type=int)
    p.add_argument("--accum_iter", default=1, type=int, help="Micro-batches accumulated per optimizer step.")
    # Model
    p.add_argument("--arch", default="vit_large", choices=ARCHS, help="ViT size (official default: ViT-L).")
    p.add_argument("--model", default=None, type=str,
                   help=f"The original's model name ({', '.join(VIT_MODELS)}); sets --arch, --patch_size and the "
                        f"size overrides.")
    p.add_argument("--patch_size", default=16, type=int, help="Patch size in pixels.")
    p.add_argument("--embed_dim", default=None, type=int, help="Override the arch's width (small CPU models).")
    p.add_argument("--depth", default=None, type=int, help="Override the arch's number of blocks.")
    p.add_argument("--num_heads", default=None, type=int, help="Override the arch's number of heads.")
    p.add_argument("--input_size", default=224, type=int, help="Image side in pixels.")
    p.add_argument("--drop_path", default=0.1, type=float, help="Stochastic depth rate.")
    p.add_argument("--global_pool", action="store_true", default=True,
                   help="Classify the average of the patch tokens after fc_norm (default).")
    p.add_argument("--cls_token", action="store_false", dest="global_pool",
                   help="Classify the [CLS] token after the final norm instead.")
    # Optimisation
    p.add_argument("--clip_grad", default=None, type=float, help="Clip the total gradient norm (default: none).")
    p.add_argument("--weight_decay", default=0.05, type=float)
    p.add_argument("--lr", default=None, type=float, help="Absolute peak learning rate; default blr x batch / 256.")
    p.add_argument("--blr", default=1e-3, type=float, help="Base learning rate: lr = blr x effective batch / 256.")
    p.add_argument("--layer_decay", default=0.75, type=float,
                   help="Layer-wise lr decay: layer i of L gets lr x layer_decay^(L - i) (0.65 for ViT-B).")
    p.add_argument("--min_lr", default=1e-6, type=float, help="Final learning rate of the cosine schedule.")
    p.add_argument("--warmup_epochs", default=5, type=int, help="Epochs of linear learning-rate warm-up.")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="Mixed precision: auto is bf16 on CUDA (fp16 with loss scaling without bf16), fp32 on CPU.")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "hpu", "ipu"],
                   help="auto picks CUDA when present, else CPU.")
    # Augmentation, mixup and regularisation (timm)
    p.add_argument("--color_jitter", default=None, type=float, help="Colour jitter (off with RandAugment).")
    p.add_argument("--aa", default="rand-m9-mstd0.5-inc1", type=str, help="timm auto-augment policy.")
    p.add_argument("--smoothing", default=0.1, type=float, help="Label smoothing.")
    p.add_argument("--reprob", default=0.25, type=float, help="Random erasing probability.")
    p.add_argument("--remode", default="pixel", type=str, help="Random erasing mode.")
    p.add_argument("--recount", default=1, type=int, help="Random erasing count.")
    p.add_argument("--resplit", action="store_true",
                   help="Accepted for MAE command lines: it applies to augmentation splits, which neither the "
                        "original nor this script uses, so it changes nothing in either.")
    p.add_argument("--mixup", default=0.8, type=float,
                   help="Mixup alpha, 0 disables (the published recipe's 0.8; the official script's default is 0).")
    p.add_argument("--cutmix", default=1.0, type=float,
                   help="CutMix alpha, 0 disables (the published recipe's 1.0; the official script's default is 0).")
    p.add_argument("--cutmix_minmax", default=None, type=float, nargs=2, help="CutMix min/max area ratio.")
    p.add_argument("--mixup_prob", default=1.0, type=float, help="Probability of mixup or cutmix per batch.")
    p.add_argument("--mixup_switch_prob", default=0.5, type=float, help="Probability of cutmix when both are on.")
    p.add_argument("--mixup_mode", default="batch", choices=["batch", "pair", "elem"])
    # Weights
    p.add_argument("--finetune", default="", type=str,
                   help="Start from these weights: our DINO/MAE checkpoints, official MAE/DINO files, timm state "
                        "dicts, Hugging Face ViT folders, Google ViT .npz. The head is dropped and position embeddings "
                        "resized; empty: from scratch.")
    p.add_argument("--checkpoint_key", default=None, type=str,
                   help="Entry of --finetune holding the weights; default: model, else teacher, else the file.")
    p.add_argument("--eval", action="store_true",
                   help="Only report top-1/top-5 of --resume (default: OUTPUT_DIR/checkpoint.pth) on the val folder.")
    p.add_argument("--resume", default="", type=str,
                   help="Checkpoint for --eval; when training, start from it (model; optimizer, scaler and epoch "
                        "when it has them) unless OUTPUT_DIR/checkpoint.pth exists, which a restarted run resumes.")
    p.add_argument("--start_epoch", default=0, type=int, help="First epoch of a run not resumed from a checkpoint.")
    p.add_argument("--dist_eval", action="store_true",
                   help="Accepted for MAE command lines: evaluation here is always split over the processes, as "
                        "the original with --dist_eval (a val set that does not divide evenly gets a few repeats).")
    # Misc
    p.add_argument("--data_path", default=None, type=str,
                   help="Folder with train/ and val/ (or test/) ImageFolder trees (with --eval, a class folder tree "
                        "works too); omitted: the embedded data set.")
    p.add_argument("--nb_classes", default=None, type=int, help="Classes of the head; default: from the folders.")
    p.add_argument("--output_dir", default="./output_dir", type=str,
                   help="Where checkpoints and log.txt go; a run restarted here resumes.")
    p.add_argument("--saveckp_freq", default=20, type=int,
                   help="Keep checkpoint-EPOCH.pth every this many epochs and at the last (0: only the last).")
    p.add_argument("--checkpoint_every_minutes", default=10, type=float,
                   help="Also write checkpoint.pth within an epoch this often, with the position in the epoch: a "
                        "killed run resumes at that batch and loses at most this much work (0 disables).")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--num_workers", default=10, type=int, help="Data loading processes per device.")
    p.add_argument("--pin_mem", action="store_true", default=True,
                   help="Pin CPU memory in the data loaders for faster copies to the GPU (default; CUDA only).")
    p.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    p.add_argument("--log_dir", default=None, type=str,
                   help="Also write TensorBoard scalars here when training (loss and lr per step, perf/test_acc1, "
                        "perf/test_acc5, perf/test_loss per epoch, as the original); needs the tensorboard package. "
                        "The original writes to ./output_dir by default, ours only when asked.")
    add_mae_launcher_args(p)
    return p


def split_folder(root, names):
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise UserError(f"{root} has no {names[0]}/ folder: give --data_path a folder holding train/ and val/, each "
                    f"with one subfolder per class")


def build_model(args, nb_classes):
    check_image_size(args.input_size, args.patch_size)
    embed_dim, depth, num_heads = arch_sizes(args.arch, args.embed_dim, args.depth, args.num_heads)
    return VisionTransformer(img_size=args.input_size, patch_size=args.patch_size, num_classes=nb_classes,
                             embed_dim=embed_dim, depth=depth, num_heads=num_heads, drop_path_rate=args.drop_path,
                             global_pool="avg" if args.global_pool else "token")


def adapt_state_dict(model, sd, source):
    """Position embeddings resized to the model's patch grid; a source of another width is refused up front."""
    if "cls_token" in sd and sd["cls_token"].shape[-1] != model.embed_dim:
        raise UserError(f"{source} holds a ViT of width {sd['cls_token'].shape[-1]} but the model is "
                        f"{model.embed_dim} wide: pass the --arch (or --embed_dim) it was trained with")
    if "pos_embed" in sd:
        sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], model.patch_embed.grid_size,
                                             1 + model.num_register_tokens)
    return sd


def load_finetune_weights(model, path, checkpoint_key=None):
    """The encoder of any supported file, without head, decoder or the norm the chosen pooling does not use.

    Only the new head and the final norms may be missing (MAE's check, plus the norm of [CLS] pooling from an
    avg-pooled source, which then starts as identity); anything else is a mismatch and stops.
    """
    backbone, stored = read_backbone(path, checkpoint_key)
    unused = ("head.", "norm.") if model.global_pool == "avg" else ("head.", "fc_norm.")
    sd = {k: v for k, v in backbone.items() if not is_decoder_key(k) and not k.startswith(unused)}
    sd = adapt_state_dict(model, sd, f"--finetune {path}")
    missing, unexpected = check_state_dict(model, sd, f"--finetune {path}", strict=False)
    missing = [k for k in missing if not k.startswith(("head.", "fc_norm.", "norm."))]
    if missing or unexpected:
        raise UserError(f"--finetune {path} does not match the model: missing keys {missing[:6]}, unexpected keys "
                        f"{unexpected[:6]}; check --arch/--depth/--checkpoint_key")
    model.load_state_dict(sd, strict=False)
    use_source_norm_eps(model, stored)
    nn.init.trunc_normal_(model.head.weight, std=HEAD_INIT_STD)


def load_eval_weights(model, path):
    """A complete classifier (ours or an official MAE fine-tuned file): everything must match."""
    ckpt = load_file(path)
    sd = adapt_state_dict(model, extract_backbone(ckpt, "model"), f"checkpoint {path}")
    check_state_dict(model, sd, f"checkpoint {path}", strict=True)
    model.load_state_dict(sd)


def build_criterion(args, nb_classes):
    """timm's mixup/cutmix with soft targets when on, else label smoothing, else plain cross-entropy."""
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=nb_classes)
        return mixup_fn, SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return None, nn.CrossEntropyLoss()


@torch.no_grad()
def evaluate(model, loader, device, precision):
    """Top-1/top-5 accuracy (%) and cross-entropy over this process's shard, summed over processes."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, images
    for images, target, _ in loader:
        if images is None:
            continue
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with autocast(device, precision):
            output = model(images)
        output = output.float()
        topk = output.topk(min(5, output.shape[1]), dim=1).indices == target[:, None]
        sums += torch.tensor([nn.functional.cross_entropy(output, target, reduction="sum").item(),
                              topk[:, :1].sum().item(), topk.sum().item(), len(target)],
                             dtype=torch.float64, device=device)
    loss, top1, top5, n = dist.all_reduce_sum(sums).tolist()
    return {"loss": loss / max(n, 1), "acc1": 100 * top1 / max(n, 1), "acc5": 100 * top5 / max(n, 1),
            "images": int(n)}


def load_data(args):
    """train/ and val/ (or test/) under --data_path; --eval also takes a folder of class subfolders itself."""
    root = Path(args.data_path) if args.data_path else ensure_default_data()
    has_split = any((root / name).is_dir() for name in ("val", "test"))
    val_root = root if args.eval and not has_split else split_folder(root, ("val", "test"))
    val = ImageDataset(val_root, eval_transform(eval_resize(args.input_size), args.input_size))
    if not val.classes:
        raise UserError(f"{val.root} has no class subfolders: evaluation needs one subfolder per class")
    if args.eval:
        return None, val
    train = ImageDataset(split_folder(root, ("train",)), finetune_transform(
        args.input_size, args.aa, args.reprob, args.remode, args.recount, args.color_jitter), seed=args.seed)
    if val.class_to_idx != train.class_to_idx:
        raise UserError(f"{val.root} and {train.root} have different class subfolders: use the same classes in both")
    return train, val


def main(args):
    device = resolve_device(args.device, dist.world_from_env()[2])
    rank, world_size, _ = dist.init_distributed(device)
    precision = resolve_precision(device, args.precision)
    log = setup_logger()
    if args.accum_iter < 1:
        raise UserError(f"--accum_iter must be at least 1, got {args.accum_iter}")
    if not args.checkpoint_every_minutes >= 0:
        raise UserError(f"--checkpoint_every_minutes must be a number >= 0 (0 disables), got "
                        f"{args.checkpoint_every_minutes}")
    output_dir = Path(args.output_dir)
    if dist.is_main_process():  # rank 0 does all writing; ranks probing at once would race on one file
        check_writable(output_dir)
    tb = TensorBoard(None if args.eval else args.log_dir)
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    random.seed(args.seed + rank)

    train, val = load_data(args)
    classes = len(val.classes)
    nb_classes = args.nb_classes or classes
    if nb_classes < classes:
        raise UserError(f"--nb_classes {nb_classes} is below the {classes} class folders: raise it or omit it")
    model = build_model(args, nb_classes)
    val_loader = build_loader(val, args.batch_size, args.num_workers, shuffle=False, drop_last=False,
                              pin_memory=args.pin_mem)
    if args.eval:
        path = Path(args.resume) if args.resume else output_dir / "checkpoint.pth"
        load_eval_weights(model, path)
        stats = evaluate(model.to(device), val_loader, device, precision)
        log.info(f"{path}: top-1 {stats['acc1']:.2f}%, top-5 {stats['acc5']:.2f}% on {stats['images']} images "
                 f"of {val.root}")
        dist.cleanup()
        return stats
    if args.finetune:
        load_finetune_weights(model, args.finetune, args.checkpoint_key)
        log.info(f"fine-tuning from {args.finetune}")
    model.to(device)

    global_batch = args.batch_size * world_size
    steps_per_epoch = len(train) // global_batch // args.accum_iter
    if steps_per_epoch == 0:
        raise UserError(f"{train.root} has {len(train)} images, fewer than one optimizer step "
                        f"({global_batch * args.accum_iter}): lower --batch_size or --accum_iter")
    loader = build_loader(train, args.batch_size, args.num_workers, seed=args.seed, pin_memory=args.pin_mem)
    model_ddp = dist.maybe_ddp(model, device)
    optimizer = build_optimizer("adamw", param_groups_layer_decay(model, args.weight_decay, model.no_weight_decay(),
                                                                  args.layer_decay), device)
    scaler = make_grad_scaler(device, precision)
    mixup_fn, criterion = build_criterion(args, nb_classes)
    effective_batch = global_batch * args.accum_iter
    lr = args.lr if args.lr is not None else args.blr * effective_batch / 256
    lr_schedule = cosine_schedule(lr, args.min_lr, args.epochs, steps_per_epoch, args.warmup_epochs,
                                  warmup_endpoint=False)
    log.info(f"data: {len(train)} train / {len(val)} val images in {nb_classes} classes, {steps_per_epoch} steps "
             f"per epoch of {effective_batch} images; lr {lr:.3g}; device {device}, precision {precision}, "
             f"{world_size} process(es)")


    def checkpoint(epoch, **position):
        """The state after `epoch` (the last finished one, as the original counts; `position` within the next
        one). Every process calls it: the RNG states are gathered."""
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "scaler": scaler.state_dict() if scaler is not None else {}, "args": vars(args),
                "max_accuracy": max_accuracy, "rng": dist.all_gather_objects(rng_state()), **position}

    ckpt_path = output_dir / "checkpoint.pth"
    resumed, run = resume_run(output_dir, args.resume, {"epoch": args.start_epoch - 1, "max_accuracy": 0.0,
                                                        "epoch_step": 0, "epoch_totals": None},
                              model=model, optimizer=optimizer, scaler=scaler)
    start_epoch, max_accuracy = run["epoch"] + 1, run["max_accuracy"]
    if resumed:
        log.info(f"resumed from {resumed} at epoch {start_epoch}, step {run['epoch_step']}")
    mid_epoch = MidEpochCheckpoints(ckpt_path, args.checkpoint_every_minutes, steps_per_epoch,
                                    lambda epoch, **position: checkpoint(epoch - 1, **position))
    mid_epoch.resume(run)
    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        train.set_epoch(epoch)
        # timm's Mixup and RandAugment draw from numpy's global generator: reseeded per epoch, a resumed run draws
        # what an uninterrupted one would (mid-epoch, from the generator's state in the checkpoint).
        if epoch > start_epoch or not run["epoch_step"]:
            np.random.seed([args.seed, rank, epoch])
        train_stats = train_one_epoch(model_ddp, model, criterion, mixup_fn, loader, optimizer, scaler, lr_schedule,
                                      epoch, steps_per_epoch, device, precision, args, ckpt_path, tb, mid_epoch)
        test_stats = evaluate(model, val_loader, device, precision)
        tb.add(epoch, {f"perf/test_{k}": test_stats[k] for k in ("acc1", "acc5", "loss")})
        improved = test_stats["acc1"] > max_accuracy
        max_accuracy = max(max_accuracy, test_stats["acc1"])
        save = checkpoint(epoch)
        if dist.is_main_process():
            save_checkpoint(save, ckpt_path)
            if args.saveckp_freq and (epoch % args.saveckp_freq == 0 or epoch + 1 == args.epochs):
                save_checkpoint(save, output_dir / f"checkpoint-{epoch}.pth")
            if improved:
                save_checkpoint({"model": save["model"], "epoch": epoch, "args": save["args"],
                                 "acc1": test_stats["acc1"]}, output_dir / "checkpoint-best.pth")
            append_json_line(output_dir / "log.txt", {**{f"train_{k}": v for k, v in train_stats.items()},
                                                      **{f"test_{k}": v for k, v in test_stats.items()},
                                                      "max_accuracy": max_accuracy, "epoch": epoch})
        mid_epoch.restart()
        log.info(f"epoch {epoch}: loss {train_stats['loss']:.4f}, val top-1 {test_stats['acc1']:.2f}% "
                 f"(best {max_accuracy:.2f}%), top-5 {test_stats['acc5']:.2f}%")
        tb.flush()
    tb.close()
    dist.barrier()
    dist.cleanup()
    return {"max_accuracy": max_accuracy}


def train_one_epoch(model_ddp, model, criterion, mixup_fn, loader, optimizer, scaler, lr_schedule, epoch,
                    steps_per_epoch, device, precision, args, ckpt_path, tb, mid_epoch):
    model_ddp.train()
    start_step, totals = mid_epoch.start()  # a run resumed mid-epoch goes on from there with the epoch's sums
    total_loss, n_loss = totals.get("loss", 0.0), totals.get("count", 0)
    progress = Progress(steps_per_epoch, epoch, args.batch_size * args.accum_iter)
    batches = MicroBatches(loader, steps_per_epoch, args.accum_iter, epoch, start_step, totals.get("n_bad", 0))
    for it, first_micro, last_micro, (samples, targets) in batches:
        if first_micro:
            set_lr(optimizer, lr_schedule[it])
        samples, targets = samples.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            if len(samples) % 2:  # a skipped image left an odd batch, which timm's Mixup cannot pair
                samples, targets = samples[:-1], targets[:-1]
            samples, targets = mixup_fn(samples, targets)
        with dist.sync_unless(model_ddp, last_micro):
            with autocast(device, precision):
                loss = criterion(model_ddp(samples), targets)
            loss_value = loss.item()
            check_finite(loss_value, it, epoch, ckpt_path, "Lower --blr, set --clip_grad or use fp32/bf16")
            loss = loss / args.accum_iter
            (scaler.scale(loss) if scaler else loss).backward()
        total_loss += loss_value
        n_loss += 1
        if not last_micro:
            continue
        clip = (lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)) if args.clip_grad else None
        apply_gradients(optimizer, scaler, clip)
        images_per_s = progress.step(loss=f"{loss_value:.4f}", lr=f"{lr_schedule[it]:.2e}")
        tb.add(epoch_1000x(it, steps_per_epoch, args.accum_iter),
               {"loss": tb.mean(loss_value, device), "lr": max(group["lr"] for group in optimizer.param_groups),
                "images_per_s": images_per_s})
        mid_epoch.save_if_due(it, {"loss": total_loss, "count": n_loss, "n_bad": batches.n_bad}, device)
    progress.close()
    loss, n_bad = epoch_totals(total_loss, n_loss, batches.n_bad, device, epoch)
    return {"loss": loss, "lr": float(lr_schedule[(epoch + 1) * steps_per_epoch - 1]), "skipped_images": n_bad}


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(get_args_parser(), "main_finetune")))
