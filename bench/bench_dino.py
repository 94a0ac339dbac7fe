"""DINO training-step throughput, peak memory and FLOP utilisation: our step against a naive eager baseline.

Random crops stand in for data, so this times the model step (teacher and student forward, backward, per-parameter
clipping, AdamW, teacher EMA, centre update), not data loading. Paths:
  ours      the step of main_dino.py after the first epoch (head output layer trained): SDPA attention, autocast at
            --precision (GradScaler for fp16), foreach EMA, optionally torch.compile of both backbones (--compile);
  baseline  the same model eager in fp32 with explicit softmax attention and the original per-parameter Python EMA.
Each path runs in a fresh process, so its peak memory is its own (CUDA: max_memory_allocated; CPU: growth of the
process's peak RSS after the imports, which counts every allocation, not only tensors).

    python bench/bench_dino.py                                    # CPU-sized defaults, < 1 min on 2 idle cores
    python bench/bench_dino.py --arch vit_small --global_size 224 --local_size 96 --local_crops_number 8 \\
        --batch_size 64 --precision bf16 --compile                # one GPU
"""
import argparse
import multiprocessing
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from core.device import (autocast, make_grad_scaler, peak_memory_bytes, resolve_device, resolve_precision,  # noqa: E402
                         synchronize)
from core.dino import DINOHead, DINOLoss, MultiCropWrapper, clip_gradients, ema_update  # noqa: E402
from core.errors import UserError, run_cli  # noqa: E402
from core.optim import apply_gradients, build_optimizer, param_groups  # noqa: E402
from core.vision_transformer import build_vit  # noqa: E402

PATHS = ("ours", "baseline")
# Dense peak TFLOP/s by device-name fragment (first match wins): (bf16/fp16, fp32). fp32 is the non-tensor-core
# peak, as torch runs fp32 matmuls without TF32 by default (float32_matmul_precision "highest").
PEAK_TFLOPS = {
    "H100 PCIe": (756.0, 51.2),
    "H100": (989.4, 66.9),
    "H200": (989.4, 66.9),
    "A100": (312.0, 19.5),
}


def get_args_parser():
    p = argparse.ArgumentParser("bench_dino", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_tiny", type=str, help="vit_tiny/small/base/large or timm/<name>.")
    p.add_argument("--patch_size", default=16, type=int)
    p.add_argument("--out_dim", default=65536, type=int, help="DINO head output dimension (recipe: 65536).")
    p.add_argument("--global_size", default=96, type=int, help="Side of the two global crops.")
    p.add_argument("--local_size", default=48, type=int, help="Side of the local crops.")
    p.add_argument("--local_crops_number", default=2, type=int)
    p.add_argument("--batch_size", default=8, type=int, help="Images per step (each gives 2 + locals crops).")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="Precision of our path (auto: bf16 on CUDA, fp32 on CPU); the baseline is always fp32.")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--compile", action="store_true", help="torch.compile both backbones in our path.")
    p.add_argument("--steps", default=5, type=int, help="Timed steps.")
    p.add_argument("--warmup", default=2, type=int, help="Untimed steps first (compilation happens here).")
    return p


@torch.no_grad()
def ema_loop(teacher, student, momentum):
    """The original DINO's teacher update: two kernels per parameter, launched one by one from Python."""
    for p_s, p_t in zip(student.parameters(), teacher.parameters()):
        p_t.mul_(momentum).add_((1 - momentum) * p_s.detach())


def build_models(args, device, fused_attn):
    student = build_vit(args.arch, args.patch_size, drop_path_rate=0.1, img_size=args.global_size)
    teacher = build_vit(args.arch, args.patch_size, img_size=args.global_size)
    for m in [*student.modules(), *teacher.modules()]:  # timm attention modules carry the same switch
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused_attn
    student = MultiCropWrapper(student, DINOHead(student.embed_dim, args.out_dim)).to(device)
    teacher = MultiCropWrapper(teacher, DINOHead(teacher.embed_dim, args.out_dim)).to(device)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher


def peak_tflops(device, precision):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peaks = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    if peaks is None:
        return None
    return peaks[1] if precision == "fp32" else peaks[0]


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def measure(args, path):
    """Time one path in this (fresh) process; returns its numbers and the resolved device and precision."""
    device = resolve_device(args.device)
    precision = resolve_precision(device, args.precision) if path == "ours" else "fp32"
    ema = ema_update if path == "ours" else ema_loop
    rss_before = peak_rss_bytes()
    torch.manual_seed(0)
    student, teacher = build_models(args, device, fused_attn=path == "ours")
    ncrops = 2 + args.local_crops_number
    loss_fn = DINOLoss(args.out_dim, ncrops, 0.04, 0.04, 0, 1).to(device)
    optimizer = build_optimizer("adamw", param_groups(student))
    for group in optimizer.param_groups:
        group["lr"] = 5e-4
        group["weight_decay"] = 0.04 if group["apply_wd"] else 0.0
    scaler = make_grad_scaler(device, precision)
    sizes = [args.global_size] * 2 + [args.local_size] * args.local_crops_number
    crops = [torch.randn(args.batch_size, 3, s, s, device=device) for s in sizes]

    def step():
        with autocast(device, precision):
            with torch.no_grad():
                teacher_output = teacher(crops[:2])
            loss = loss_fn(student(crops), teacher_output, 0)
        (scaler.scale(loss) if scaler else loss).backward()
        apply_gradients(optimizer, scaler, lambda: clip_gradients(student, 3.0))
        ema(teacher, student, 0.996)
        loss_fn.update_center()

    flops = count_flops(step, student, teacher)
    if path == "ours" and args.compile:
        student.backbone = torch.compile(student.backbone)
        teacher.backbone = torch.compile(teacher.backbone)
    return time_steps(step, args, device, precision, rss_before, flops)


def count_flops(step, *models):
    """Model FLOPs of one step, counted on the explicit attention path (the counter adds SDPA backward's
    recomputation). Both paths run this untimed step, so their warm-up is the same."""
    switches = [m for model in models for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    saved = [m.fused_attn for m in switches]
    for m in switches:
        m.fused_attn = False
    with FlopCounterMode(display=False) as counter:
        step()
    for m, value in zip(switches, saved):
        m.fused_attn = value
    return counter.get_total_flops()


def time_steps(step, args, device, precision, rss_before, flops):
    """Run --warmup untimed then --steps timed calls of step; samples/s, step time and this process's peak memory."""
    for _ in range(args.warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    memory = peak_memory_bytes(device)
    if memory is None:
        memory = peak_rss_bytes() - rss_before
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"samples_s": args.batch_size / seconds, "step_ms": 1000 * seconds, "memory": memory, "flops": flops,
            "peak_tflops": peak_tflops(device, precision), "precision": precision, "device": device_name}


def mfu(flops, result):
    if result["peak_tflops"] is None:
        return "n/a"
    return f"{100 * flops / (result['step_ms'] / 1000) / (result['peak_tflops'] * 1e12):.1f}%"


def main(args):
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.local_crops_number < 0:
        raise UserError("--steps and --batch_size must be at least 1, --warmup and --local_crops_number at least 0")
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        results = {path: pool.apply(measure, (args, path)) for path in PATHS}
    ours, base = results["ours"], results["baseline"]
    flops = base["flops"]
    cuda = ours["device"] != "cpu"
    print(f"config: {args.arch}/{args.patch_size}, crops 2x{args.global_size} + {args.local_crops_number}x"
          f"{args.local_size}, batch {args.batch_size}, precision {ours['precision']} (baseline fp32), "
          f"compile {'on' if args.compile else 'off'}, device {ours['device']}, torch {torch.__version__}, "
          f"{args.steps} steps after {args.warmup} warm-up")
    print(f"FLOPs per step (student fwd+bwd, teacher fwd): {flops / 1e9:.2f} GFLOP")
    memory_label = "peak alloc MiB" if cuda else "peak RSS MiB*"
    print(f"{'path':<10}{'samples/s':>11}{'step ms':>10}{memory_label:>16}{'MFU':>7}")
    for path, r in results.items():
        print(f"{path:<10}{r['samples_s']:>11.1f}{r['step_ms']:>10.1f}{r['memory'] / 2**20:>16.0f}{mfu(flops, r):>7}")
    memory_ratio = f"{ours['memory'] / base['memory']:.2f}x" if base["memory"] > 0 else "n/a"
    print(f"ours/baseline: throughput {ours['samples_s'] / base['samples_s']:.2f}x, memory {memory_ratio}")
    if not cuda:
        print("* growth of the process's peak resident set size (resource.getrusage), each path in its own process")


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
