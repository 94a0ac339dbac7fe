"""Linear evaluation on frozen features, the DINO protocol: a linear layer on the [CLS] tokens of the last
n_last_blocks blocks (4 for ViT-S; 1 plus the average patch token for ViT-B), SGD with momentum 0.9 and no weight
decay, lr x global batch / 256 decayed by a cosine to 0 over 100 epochs, RandomResizedCrop and flip for training.

Beyond the original: --cached_features extracts the features once (no augmentation) and trains on them, much
faster; --lr takes several values and trains one head per value in the same pass, reporting the best (as DINOv2).

    python eval_linear.py --pretrained_weights runs/dino/checkpoint.pth --data_path /path/to/imagenet
    torchrun --nproc_per_node 8 eval_linear.py --arch vit_base --n_last_blocks 1 --avgpool_patchtokens true ...
"""
import argparse
import functools
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from core import distributed as dist
from core.augment import eval_transform, linear_train_transform
from core.checkpoint import (check_state_dict, load_file, restart_from_checkpoint, rng_state, save_checkpoint,
                             strip_prefixes)
from core.config import add_launcher_args, bool_flag, parse_args
from core.data import build_loader
from core.device import autocast
from core.errors import UserError, run_cli
from core.features import (add_eval_args, block_features, build_backbone, extract_features, init_eval,
                           labelled_datasets, load_features, save_features)
from core.log import TensorBoard, append_json_line, setup_logger

CHECKPOINT = "checkpoint.pth.tar"


def get_args_parser():
    p = argparse.ArgumentParser("Linear evaluation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, type=str,
                   help="Named configuration (section eval_linear of configs.yml).")
    add_eval_args(p)
    p.add_argument("--n_last_blocks", default=4, type=int,
                   help="Concatenate the [CLS] tokens of the last n blocks: 4 for ViT-S, 1 for ViT-B.")
    p.add_argument("--avgpool_patchtokens", default=False, type=bool_flag,
                   help="Also use the average patch token of the last block (true for ViT-B).")
    p.add_argument("--epochs", default=100, type=int, help="Number of training epochs.")
    p.add_argument("--lr", default=[0.001], type=float, nargs="+",
                   help="Learning rate(s) for a global batch of 256, scaled linearly; several values train one head "
                        "each in the same pass and the best is reported.")
    p.add_argument("--num_labels", default=None, type=int, help="Number of classes; default: read from the data.")
    p.add_argument("--val_freq", default=1, type=int, help="Epochs between evaluations.")
    p.add_argument("--output_dir", default=".", type=str,
                   help="Where checkpoint.pth.tar and log.txt go; a run restarted here resumes where it stopped.")
    p.add_argument("--evaluate", action="store_true", help="Only evaluate a saved linear head on the val split.")
    p.add_argument("--linear_weights", default=None, type=str,
                   help="Linear head for --evaluate (key state_dict); default: checkpoint.pth.tar in --output_dir.")
    p.add_argument("--cached_features", action="store_true",
                   help="Extract features once (centre crops, no augmentation) and train on them.")
    p.add_argument("--log_dir", default=None, type=str,
                   help="Also write TensorBoard scalars per epoch here: train_loss, lr, test_acc1, test_acc5 per "
                        "--lr value (as lr<value>), images/s (needs the tensorboard package).")
    add_launcher_args(p)
    return p


class LinearClassifier(nn.Module):
    """DINO's linear head; weight N(0, 0.01), bias 0."""

    def __init__(self, dim, num_labels=1000):
        super().__init__()
        self.num_labels = num_labels
        self.linear = nn.Linear(dim, num_labels)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x):
        return self.linear(x.view(x.size(0), -1))


def build_heads(dim, num_labels, lrs, scale, epochs, seed=0):
    """One head per learning rate, in one SGD (a param group each) under one per-epoch cosine schedule to 0.

    Every head starts from the same seeded weights, so the sweep compares learning rates only, and a head of the
    sweep trains exactly as it would alone."""
    heads = nn.ModuleList()
    for _ in lrs:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            heads.append(LinearClassifier(dim, num_labels))
    groups = [{"params": head.parameters(), "lr": lr * scale} for head, lr in zip(heads, lrs)]
    optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0)
    return heads, optimizer, scheduler


def train_epoch(heads_ddp, optimizer, batches, device, steps, epoch):
    """One pass; the heads' losses are summed, which gives each head exactly its own gradient."""
    heads_ddp.train()
    criterion = nn.CrossEntropyLoss()
    total = torch.zeros(len(optimizer.param_groups), dtype=torch.float64)
    n = 0
    for features, labels in tqdm(batches, total=steps, desc=f"epoch {epoch}", disable=not dist.is_main_process(),
                                 leave=False, file=sys.stdout, dynamic_ncols=True):
        features, labels = features.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        losses = torch.stack([criterion(out, labels) for out in heads_ddp(features)])
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        optimizer.step()
        total += losses.detach().double().cpu()
        n += 1
    return (total / max(n, 1)).tolist()


class HeadsForward(nn.Module):
    """Runs every head on the same features: one module, so one DDP wrapper covers all heads."""

    def __init__(self, heads):
        super().__init__()
        self.heads = heads

    def forward(self, x):
        return [head(x) for head in self.heads]


@torch.no_grad()
def accuracy(heads, features, labels, device, batch_size=1024):
    """[(top-1 %, top-5 % or None)] per head; top-5 only with at least 5 classes, as in the original."""
    correct = torch.zeros(len(heads), 2, dtype=torch.long)
    heads.eval()
    for x, y in zip(features.split(batch_size), labels.split(batch_size)):
        x, y = x.to(device), y.to(device)
        for i, head in enumerate(heads):
            top = head(x).topk(min(5, head.num_labels), dim=1).indices
            hits = top == y[:, None]
            correct[i] += torch.stack((hits[:, 0].sum(), hits.any(dim=1).sum())).cpu()
    n = len(labels)
    return [(100.0 * c[0].item() / n, 100.0 * c[1].item() / n if heads[0].num_labels >= 5 else None)
            for c in correct]


def cached_batches(features, labels, batch_size, epoch, seed):
    """Shuffled full batches (drop_last, as the original loader), in an order set by seed and epoch only, so that
    a resumed run sees the same batches."""
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed + epoch))
    for idx in order[:len(order) // batch_size * batch_size].split(batch_size):
        yield features[idx], labels[idx]


def image_batches(loader, embed, device, precision):
    for images, labels, _ in loader:
        if images is None:
            continue
        with torch.no_grad(), autocast(device, precision):
            features = embed(images.to(device, non_blocking=True))
        yield features.float(), labels


class Data:
    """Training batches (cached features or augmented images through the backbone) and the val features, which a
    frozen backbone and a deterministic transform make constant: they are extracted once, up front."""

    def __init__(self, args, device, precision, log):
        self.args, self.device, self.precision = args, device, precision
        self.global_batch = args.batch_size_per_gpu * dist.get_world_size()
        if (args.load_features or args.dump_features) and not args.cached_features:
            raise UserError("--load_features and --dump_features work on cached features: add --cached_features")
        if args.load_features:
            self.train_features, self.val_features, self.train_labels, self.val_labels = \
                load_features(args.load_features)
            self.num_labels = args.num_labels or int(max(self.train_labels.max(), self.val_labels.max())) + 1
            self.dim = self.train_features.shape[1]
            log.info(f"loaded features from {args.load_features}")
            return
        model, description = build_backbone(args.pretrained_weights, args.checkpoint_key, args.arch,
                                            args.patch_size, img_size=args.crop)
        if args.pretrained_weights:
            log.info(f"backbone: {description}")
        else:
            log.warning(f"WARNING: no --pretrained_weights: evaluating a {description} backbone (a random baseline)")
        self.dim = model.embed_dim * (args.n_last_blocks + int(args.avgpool_patchtokens))
        self.embed = functools.partial(block_features, model.to(device), n_last_blocks=args.n_last_blocks,
                                       avgpool=args.avgpool_patchtokens)
        val_transform = eval_transform(args.resize, args.crop)
        train_transform = val_transform if args.cached_features else linear_train_transform(args.crop)
        train, val = labelled_datasets(args.data_path, train_transform, val_transform)
        self.num_labels = args.num_labels or len(train.classes)
        log.info(f"data: {len(train)} train and {len(val)} val images, {self.num_labels} classes")
        self.val_features, self.val_labels = self.extract(val)
        if args.cached_features:
            self.train_features, self.train_labels = self.extract(train)
            if args.dump_features and dist.is_main_process():
                save_features(args.dump_features, self.train_features, self.val_features, self.train_labels,
                              self.val_labels)
        elif not args.evaluate:
            train.seed = args.seed  # crops drawn per (seed, epoch, image): persistent workers resume exactly
            self.loader = build_loader(train, args.batch_size_per_gpu, args.num_workers, seed=args.seed)

    def extract(self, dataset):
        return extract_features(self.embed, dataset, self.device, self.precision, self.args.batch_size_per_gpu,
                                self.args.num_workers)

    def steps(self):
        if self.args.cached_features:
            return len(self.train_features) // self.global_batch
        return len(self.loader)

    def epoch(self, epoch):
        if self.args.cached_features:
            return cached_batches(self.train_features, self.train_labels, self.global_batch, epoch, self.args.seed)
        self.loader.sampler.set_epoch(epoch)
        self.loader.dataset.set_epoch(epoch)
        return image_batches(self.loader, self.embed, self.device, self.precision)


def evaluate_saved_head(args, data, device, log):
    path = Path(args.linear_weights or Path(args.output_dir) / CHECKPOINT)
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict", ckpt), dict):
        raise UserError(f"{path} is not a linear head checkpoint: expected a 'state_dict' entry")
    state = strip_prefixes(ckpt.get("state_dict", ckpt), ("module.",))
    head = LinearClassifier(data.dim, data.num_labels)
    weight = state.get("linear.weight")
    if torch.is_tensor(weight) and weight.shape != head.linear.weight.shape:
        raise UserError(f"{path} holds a head for {weight.shape[0]} classes on {weight.shape[1]}-d features; this "
                        f"run has {data.num_labels} classes and {data.dim}-d features: match --num_labels, "
                        f"--n_last_blocks and --avgpool_patchtokens")
    check_state_dict(head, state, f"linear weights {path}")
    head.load_state_dict(state)
    top1, top5 = accuracy(nn.ModuleList([head.to(device)]), data.val_features, data.val_labels, device)[0]
    log.info(f"Accuracy of the linear head {path} on the {len(data.val_labels)} val images: top-1 {top1:.2f}"
             + (f", top-5 {top5:.2f}" if top5 is not None else ""))
    return {"acc1": top1, "acc5": top5}


def main(args):
    device, precision = init_eval(args)
    log = setup_logger()
    tb = TensorBoard(None if args.evaluate else args.log_dir)
    if args.epochs < 1 or args.val_freq < 1:
        raise UserError("--epochs and --val_freq must be at least 1")
    data = Data(args, device, precision, log)
    if args.evaluate:
        result = evaluate_saved_head(args, data, device, log)
        dist.cleanup()
        return result
    if data.steps() == 0:
        raise UserError(f"fewer training images than one global batch ({data.global_batch}): lower "
                        f"--batch_size_per_gpu or add images")
    output_dir = Path(args.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --output_dir {output_dir} ({e.strerror}): choose a writable folder") from e
    scale = data.global_batch / 256.0
    heads, optimizer, scheduler = build_heads(data.dim, data.num_labels, args.lr, scale, args.epochs, args.seed)
    heads.to(device)
    forward = HeadsForward(heads)
    heads_ddp = forward if args.cached_features else dist.maybe_ddp(forward, device)
    state = restart_from_checkpoint(output_dir / CHECKPOINT, {"epoch": 0, "best_acc": 0.0, "best_index": 0},
                                    heads=heads, optimizer=optimizer, scheduler=scheduler)
    if state["epoch"]:
        log.info(f"resumed from {output_dir / CHECKPOINT} at epoch {state['epoch']}")
    for epoch in range(state["epoch"], args.epochs):
        lrs = [group["lr"] for group in optimizer.param_groups]
        start = time.perf_counter()
        losses = train_epoch(heads_ddp, optimizer, data.epoch(epoch), device, data.steps(), epoch)
        tb.add(epoch, {"images_per_s": data.steps() * data.global_batch / (time.perf_counter() - start),
                       **{f"train_loss/lr{lr:g}": loss for lr, loss in zip(args.lr, losses)},
                       **{f"lr/lr{lr:g}": group_lr for lr, group_lr in zip(args.lr, lrs)}})
        scheduler.step()
        record = {"epoch": epoch, "train_lr": lrs,
                  **{f"train_loss_lr{lr:g}": loss for lr, loss in zip(args.lr, losses)}}
        if epoch % args.val_freq == 0 or epoch == args.epochs - 1:
            accs = accuracy(heads, data.val_features, data.val_labels, device)
            state["best_index"] = max(range(len(accs)), key=lambda i: accs[i][0])
            state["best_acc"] = max(state["best_acc"], accs[state["best_index"]][0])
            record.update({f"test_acc1_lr{lr:g}": acc[0] for lr, acc in zip(args.lr, accs)})
            for lr, (top1, top5) in zip(args.lr, accs):
                tb.add(epoch, {f"test_acc1/lr{lr:g}": top1, f"test_acc5/lr{lr:g}": top5})
            log.info(f"epoch {epoch}: top-1 per lr " + ", ".join(f"{lr:g}: {a[0]:.2f}" for lr, a in zip(args.lr, accs))
                     + f"; max accuracy so far {state['best_acc']:.2f}")
        save = {
            "epoch": epoch + 1,
            "state_dict": {f"module.{k}": v for k, v in heads[state["best_index"]].state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "best_acc": state["best_acc"],
            "best_index": state["best_index"],
            "lr": args.lr[state["best_index"]],
            "heads": heads.state_dict(),
            "rng": dist.all_gather_objects(rng_state()),
        }
        if dist.is_main_process():
            save_checkpoint(save, output_dir / CHECKPOINT)
            append_json_line(output_dir / "log.txt", record)
        tb.flush()
    tb.close()
    best_lr = args.lr[state["best_index"]]
    log.info(f"Training of the supervised linear classifier on frozen features completed.\n"
             f"Top-1 test accuracy: {state['best_acc']:.1f} (best lr {best_lr:g})")
    dist.barrier()
    dist.cleanup()
    return {"best_acc": state["best_acc"], "best_lr": best_lr}


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(get_args_parser(), "eval_linear")))
