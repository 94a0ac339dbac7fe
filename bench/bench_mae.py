"""MAE pretraining and fine-tuning training-step throughput and peak memory, each against a naive baseline.

Random images stand in for data, so this times the model step (forward, backward, AdamW), not data loading. Paths:
  mae                the step of main_pretrain_mae.py: the encoder sees only the visible patches (25%);
  mae_baseline       the same model with every patch through the encoder, removed ones replaced by a learned mask
                     token (the paper's "encoder w/ [M]", which it reports about 3x slower); same precision;
  finetune           the step of main_finetune.py: SDPA attention, autocast at --precision, layer-wise lr decay;
  finetune_baseline  the same model eager in fp32 with the original's forward: explicit softmax attention, drop path
                     multiplying the whole batch by its mask, torch's default AdamW.
Each path runs in a fresh process, so its peak memory is its own (CUDA: max_memory_allocated; CPU: growth of the
process's peak RSS after the imports).

    python bench/bench_mae.py                                                     # CPU-sized defaults
    python bench/bench_mae.py --arch vit_base --patch_size 16 --input_size 224 --batch_size 64 \\
        --decoder_embed_dim 512 --decoder_depth 8 --precision bf16                # one GPU, the published sizes
"""
import argparse
import functools
import multiprocessing
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench_dino import count_flops, mfu, original_forward, peak_rss_bytes, time_steps  # noqa: E402
from core.device import autocast, make_grad_scaler, resolve_device, resolve_precision  # noqa: E402
from core.errors import UserError, run_cli  # noqa: E402
from core.mae import build_mae, check_mask_ratio, random_masking  # noqa: E402
from core.optim import apply_gradients, build_optimizer, param_groups, param_groups_layer_decay, set_lr  # noqa: E402
from core.vision_transformer import VisionTransformer, arch_sizes, check_image_size  # noqa: E402

PATHS = ("mae", "mae_baseline", "finetune", "finetune_baseline")


def get_args_parser():
    p = argparse.ArgumentParser("bench_mae", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_tiny", type=str, help="vit_tiny/small/base/large.")
    p.add_argument("--patch_size", default=8, type=int)
    p.add_argument("--input_size", default=64, type=int, help="Image side in pixels.")
    p.add_argument("--batch_size", default=8, type=int, help="Images per step.")
    p.add_argument("--mask_ratio", default=0.75, type=float)
    p.add_argument("--decoder_embed_dim", default=128, type=int, help="Published: 512.")
    p.add_argument("--decoder_depth", default=2, type=int, help="Published: 8.")
    p.add_argument("--decoder_num_heads", default=4, type=int, help="Published: 16.")
    p.add_argument("--num_classes", default=1000, type=int, help="Classifier outputs for fine-tuning.")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="Precision of mae, mae_baseline and finetune (auto: bf16 on CUDA, fp32 on CPU); "
                        "finetune_baseline is always fp32.")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--steps", default=5, type=int, help="Timed steps.")
    p.add_argument("--warmup", default=2, type=int, help="Untimed steps first.")
    return p


def dense_mae_loss(model, mask_token, imgs, mask_ratio):
    """MAE with mask tokens in the encoder: all patches through every block, the decoder without its own tokens."""
    x = model.patch_embed(imgs)
    B, L, D = x.shape
    _, mask, _ = random_masking(x, mask_ratio)
    x = torch.where(mask.bool().unsqueeze(-1), mask_token.expand(B, L, D), x) + model.pos_embed[:, 1:]
    x = torch.cat(((model.cls_token + model.pos_embed[:, :1]).expand(B, -1, -1), x), dim=1)
    for blk in model.blocks:
        x = blk(x)
    x = model.decoder_embed(model.norm(x)) + model.decoder_pos_embed
    for blk in model.decoder_blocks:
        x = blk(x)
    pred = model.decoder_pred(model.decoder_norm(x))[:, 1:]
    return model.forward_loss(imgs, pred, mask)


def build_step(args, path, device, precision):
    """The model and a closure running one optimizer step of `path`."""
    imgs = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    embed_dim, depth, num_heads = arch_sizes(args.arch)
    if path.startswith("mae"):
        model = build_mae(args.arch, args.patch_size, args.input_size, decoder_embed_dim=args.decoder_embed_dim,
                          decoder_depth=args.decoder_depth, decoder_num_heads=args.decoder_num_heads,
                          norm_pix_loss=True).to(device)
        mask_token = torch.nn.Parameter(torch.zeros(1, 1, embed_dim, device=device))
        optimizer = build_optimizer("adamw", param_groups(model) + [{"params": [mask_token]}], betas=(0.9, 0.95))

        def loss_fn():
            if path == "mae":
                return model(imgs, args.mask_ratio)[0]
            return dense_mae_loss(model, mask_token, imgs, args.mask_ratio)
    else:
        model = VisionTransformer(img_size=args.input_size, patch_size=args.patch_size, num_classes=args.num_classes,
                                  embed_dim=embed_dim, depth=depth, num_heads=num_heads, drop_path_rate=0.1,
                                  global_pool="avg").to(device)
        ours = path == "finetune"
        model.fused_attn = ours
        optimizer = build_optimizer("adamw", param_groups_layer_decay(model, 0.05, model.no_weight_decay(), 0.75),
                                    device if ours else None)
        target = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
        forward = model if ours else functools.partial(original_forward, model)

        def loss_fn():
            return torch.nn.functional.cross_entropy(forward(imgs), target)
    set_lr(optimizer, 1e-4)
    scaler = make_grad_scaler(device, precision)

    def step():
        with autocast(device, precision):
            loss = loss_fn()
        (scaler.scale(loss) if scaler else loss).backward()
        apply_gradients(optimizer, scaler)
    return model, step


def measure(args, path):
    """Time one path in this (fresh) process."""
    device = resolve_device(args.device)
    precision = "fp32" if path == "finetune_baseline" else resolve_precision(device, args.precision)
    rss_before = peak_rss_bytes()
    torch.manual_seed(0)
    model, step = build_step(args, path, device, precision)
    return time_steps(step, args, device, precision, rss_before, count_flops(step, model))


def ratio(a, b):
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def main(args):
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        raise UserError("--steps and --batch_size must be at least 1, --warmup at least 0")
    check_mask_ratio(args.mask_ratio)
    check_image_size(args.input_size, args.patch_size)
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        results = {path: pool.apply(measure, (args, path)) for path in PATHS}
    cuda = results["mae"]["device"] != "cpu"
    print(f"config: {args.arch}/{args.patch_size} at {args.input_size} px, batch {args.batch_size}, mask ratio "
          f"{args.mask_ratio}, decoder {args.decoder_embed_dim}-d x {args.decoder_depth}, precision "
          f"{results['mae']['precision']} (finetune_baseline fp32), device {results['mae']['device']}, "
          f"torch {torch.__version__}, {args.steps} steps after {args.warmup} warm-up")
    memory_label = "peak alloc MiB" if cuda else "peak RSS MiB*"
    print(f"{'path':<19}{'samples/s':>11}{'step ms':>10}{'GFLOP/step':>12}{memory_label:>16}{'MFU':>7}")
    for path, r in results.items():
        print(f"{path:<19}{r['samples_s']:>11.1f}{r['step_ms']:>10.1f}{r['flops'] / 1e9:>12.2f}"
              f"{r['memory'] / 2**20:>16.0f}{mfu(r['flops'], r):>7}")
    for ours, base in (("mae", "mae_baseline"), ("finetune", "finetune_baseline")):
        o, b = results[ours], results[base]
        print(f"{ours}/{base}: throughput {ratio(o['samples_s'], b['samples_s'])}, memory "
              f"{ratio(o['memory'], b['memory'])}, FLOPs {ratio(o['flops'], b['flops'])}")
    if not cuda:
        print("* growth of the process's peak resident set size (resource.getrusage), each path in its own process")


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
