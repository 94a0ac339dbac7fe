"""DINO training-step throughput, peak memory and FLOP utilisation: our step against the original's, same run.

Without --data, random crops stand in for data, so this times the model step (teacher and student forward,
backward, per-parameter clipping, AdamW, teacher EMA, centre update). With --data FOLDER it times the whole thing,
loader included: each step waits for its batch. Paths:
  ours      the step of main_dino.py after the first epoch (head output layer trained): SDPA attention, the last
            block computing the [CLS] token alone, drop path skipping the dropped samples' branches on a CPU,
            autocast at --precision (auto: bf16 on CUDA, fp32 on CPU; GradScaler for fp16), the loss's log-softmax
            once per view, foreach clipping and EMA, fused AdamW, no host sync, optionally torch.compile of both
            backbones (--compile); with --data our loader (persistent workers, pinned memory, the CPU pipeline, or
            with --gpu_augment crops and flips only and the photometric stage batched on the device);
  baseline  the original's modules: the same model eager in fp32 with the original's forward (explicit softmax
            attention, every block computing every token, drop path multiplying by its mask), the head's output
            layer normalised by torch's weight_norm hook as in the original, the pairwise loss with a log-softmax
            per pair, per-parameter clipping and EMA loops, torch's default AdamW, the loss read back every step;
            with --data the original's loader (torchvision's PIL chain, workers restarted every epoch).
Each path runs in a fresh process, so its peak memory is its own (CUDA: max_memory_allocated; CPU: growth of the
process's peak RSS after the imports, which counts every allocation, not only tensors).

    python bench/bench_dino.py                                    # CPU-sized defaults, < 1 min on 2 idle cores
    python bench/bench_dino.py --data ../shared/data/imagenette-160/train --num_workers 1   # with the loaders
    python bench/bench_dino.py --arch vit_small --global_size 224 --local_size 96 --local_crops_number 10 \\
        --batch_size 128 --compile --data /data/imagenet/train --gpu_augment --num_workers 16   # one GPU
"""
import argparse
import concurrent.futures
import itertools
import multiprocessing
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from torchvision.datasets import ImageFolder  # noqa: E402

from bench.bench_augment import OriginalAugmentation  # noqa: E402
from core.augment import DataAugmentationDINO  # noqa: E402
from core.data import ImageDataset, build_loader  # noqa: E402

from core.device import (autocast, make_grad_scaler, peak_memory_bytes, resolve_device, resolve_precision,  # noqa: E402
                         synchronize)
from core.dino import DINOHead, DINOLoss, MultiCropWrapper, clip_gradients, compile_backbones, ema_update  # noqa: E402
from core.errors import UserError, run_cli  # noqa: E402
from core.gpu_augment import GPUAugmentDINO  # noqa: E402
from core.optim import apply_gradients, build_optimizer, param_groups  # noqa: E402
from core.vision_transformer import ARCHS, build_vit  # noqa: E402

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
    p.add_argument("--data", default=None, type=str,
                   help="Image folder (ImageFolder tree): time the loaders with the step, end to end.")
    p.add_argument("--gpu_augment", action="store_true",
                   help="With --data: our path's photometric stage on the device.")
    p.add_argument("--num_workers", default=2, type=int, help="With --data: loader workers of each path.")
    p.add_argument("--steps", default=5, type=int, help="Timed steps.")
    p.add_argument("--warmup", default=2, type=int, help="Untimed steps first (compilation happens here).")
    p.add_argument("--threads", default=0, type=int,
                   help="torch threads per path (0: torch's default); 1 adds samples per CPU-second, robust to load.")
    p.add_argument("--reps", default=2, type=int,
                   help="Interleaved repetitions of each path (a fresh process each); the median is reported.")
    return p


@torch.no_grad()
def ema_loop(teacher, student, momentum):
    """The original DINO's teacher update: two kernels per parameter, launched one by one from Python."""
    for p_s, p_t in zip(student.parameters(), teacher.parameters()):
        p_t.mul_(momentum).add_((1 - momentum) * p_s.detach())


def clip_loop(model, clip):
    """The original's clip_gradients: a norm per parameter, compared on the host (a sync per parameter)."""
    for p in model.parameters():
        if p.grad is not None:
            clip_coef = clip / (p.grad.norm(2) + 1e-6)
            if clip_coef < 1:
                p.grad.mul_(clip_coef)


class PairwiseDINOLoss(DINOLoss):
    """The original's loss: a log-softmax of the student view for every (teacher view, student view) pair."""

    def forward(self, student_output, teacher_output, epoch):
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        teacher_out = F.softmax((teacher_output - self.center) / self.teacher_temp_schedule[epoch], dim=-1)
        total, n_terms = 0.0, 0
        for iq, q in enumerate(teacher_out.detach().chunk(2)):
            for v in range(len(student_out)):
                if v != iq:
                    total = total + torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
                    n_terms += 1
        self.accumulate_center(teacher_output)
        return total / n_terms


def original_forward(vit, x):
    """The original ViT's forward (DINO's, and timm's that MAE fine-tunes) over our modules: every block computes
    every token though the head reads one or their mean, drop path multiplies the whole batch by its mask, and the
    attention is whatever vit.fused_attn says (explicit in the baselines)."""
    x = vit.prepare_tokens(x)
    for blk in vit.blocks:
        x = x + blk.drop_path(blk.ls1(blk.attn(blk.norm1(x))))
        x = x + blk.drop_path(blk.ls2(blk.mlp(blk.norm2(x))))
    x = vit.norm(x)
    if vit.global_pool == "avg":
        return vit.head(vit.fc_norm(x[:, 1 + vit.num_register_tokens:].mean(dim=1)))
    return vit.head(x[:, 0])


class OriginalBackbone(torch.nn.Module):
    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return original_forward(self.vit, x)


def original_head(dim, out_dim):
    """DINOHead with the original's output layer, torch's weight_norm hook (same weight_g/weight_v keys)."""
    head = DINOHead(dim, out_dim)
    # torch deprecates the hook in favour of parametrizations (the original uses it); the layer's own random init,
    # overwritten below, must not shift the random stream, so both paths draw the same crops and drop-path masks
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore", FutureWarning)
        layer = torch.nn.utils.weight_norm(torch.nn.Linear(head.last_layer.weight_v.shape[1], out_dim, bias=False))
    with torch.no_grad():
        layer.weight_v.copy_(head.last_layer.weight_v)
        layer.weight_g.fill_(1)
    layer.weight_g.requires_grad = False
    head.last_layer = layer
    return head


def build_models(args, device, fused_attn):
    student = build_vit(args.arch, args.patch_size, drop_path_rate=0.1, img_size=args.global_size)
    teacher = build_vit(args.arch, args.patch_size, img_size=args.global_size)
    dim = student.embed_dim
    make_head = DINOHead if fused_attn else original_head
    if not fused_attn and args.arch in ARCHS:
        student, teacher = OriginalBackbone(student), OriginalBackbone(teacher)
    for m in [*student.modules(), *teacher.modules()]:  # timm attention modules carry the same switch
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused_attn
    student = MultiCropWrapper(student, make_head(dim, args.out_dim)).to(device)
    teacher = MultiCropWrapper(teacher, make_head(dim, args.out_dim)).to(device)
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


def data_batches(args, path, device):
    """Endless crops from a loader over --data, on the device: ours or the original's (see the module doc)."""
    sizes = (args.global_size, args.local_size, args.local_crops_number)
    if path == "baseline":
        dataset = ImageFolder(args.data, OriginalAugmentation(*sizes))
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                            pin_memory=device.type == "cuda", drop_last=True)
        while True:
            for crops, _ in loader:
                yield [c.to(device, non_blocking=True) for c in crops]
    gpu = args.gpu_augment
    transform = DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), args.local_crops_number, args.global_size,
                                     args.local_size, photometric=not gpu)
    dataset = ImageDataset(args.data, transform, seed=0)
    loader = build_loader(dataset, args.batch_size, args.num_workers)
    augment = GPUAugmentDINO(transform.views, transform.sigma_scale, 0, args.batch_size) if gpu else None
    for epoch in itertools.count():
        loader.sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        for step, (crops, _, _) in enumerate(loader):
            crops = [c.to(device, non_blocking=True) for c in crops]
            yield augment(crops, step) if gpu else crops


def measure(args, path):
    """Time one path in this (fresh) process; returns its numbers and the resolved device and precision."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    ours = path == "ours"
    precision = resolve_precision(device, args.precision) if ours else "fp32"
    ema, clip = (ema_update, clip_gradients) if ours else (ema_loop, clip_loop)
    rss_before = peak_rss_bytes()
    torch.manual_seed(0)
    student, teacher = build_models(args, device, fused_attn=ours)
    ncrops = 2 + args.local_crops_number
    loss_fn = (DINOLoss if ours else PairwiseDINOLoss)(args.out_dim, ncrops, 0.04, 0.04, 0, 1).to(device)
    optimizer = build_optimizer("adamw", param_groups(student), device if ours else None)
    for group in optimizer.param_groups:
        group["lr"] = 5e-4
        group["weight_decay"] = 0.04 if group["apply_wd"] else 0.0
    scaler = make_grad_scaler(device, precision)
    if args.data:
        batches = data_batches(args, path, device)
    else:
        sizes = [args.global_size] * 2 + [args.local_size] * args.local_crops_number
        batches = itertools.repeat([torch.randn(args.batch_size, 3, s, s, device=device) for s in sizes])

    def step():
        crops = next(batches)
        with autocast(device, precision):
            with torch.no_grad():
                teacher_output = teacher(crops[:2])
            loss = loss_fn(student(crops), teacher_output, 0)
        if not ours:
            loss.item()  # the original checks math.isfinite(loss.item()) every step
        (scaler.scale(loss) if scaler else loss).backward()
        apply_gradients(optimizer, scaler, lambda: clip(student, 3.0))
        ema(teacher, student, 0.996)
        loss_fn.update_center()

    flops = count_flops(step, student, teacher)
    if ours and args.compile:
        compile_backbones(student, teacher)
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
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    cpu_seconds = (time.process_time() - cpu_start) / args.steps
    memory = peak_memory_bytes(device)
    if memory is None:
        memory = peak_rss_bytes() - rss_before
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"samples_s": args.batch_size / seconds, "step_ms": 1000 * seconds, "memory": memory, "flops": flops,
            "samples_cpu_s": args.batch_size / cpu_seconds,
            "peak_tflops": peak_tflops(device, precision), "precision": precision, "device": device_name}


def mfu(flops, result):
    if result["peak_tflops"] is None:
        return "n/a"
    return f"{100 * flops / (result['step_ms'] / 1000) / (result['peak_tflops'] * 1e12):.1f}%"


def main(args):
    if min(args.steps, args.batch_size, args.reps) < 1 or args.warmup < 0 or args.local_crops_number < 0:
        raise UserError("--steps, --batch_size and --reps must be at least 1, --warmup and --local_crops_number at "
                        "least 0")
    if args.data and not Path(args.data).is_dir():
        raise UserError(f"--data {args.data} is not a folder: give an ImageFolder tree of images")
    runs = {path: [] for path in PATHS}
    for _ in range(args.reps):
        for path in PATHS:  # a fresh process each (not a daemon, which could not start loader workers)
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                runs[path].append(pool.submit(measure, args, path).result())
    results = {path: sorted(r, key=lambda x: x["samples_s"])[len(r) // 2] for path, r in runs.items()}
    for path, r in runs.items():
        results[path]["samples_cpu_s"] = statistics.median(x["samples_cpu_s"] for x in r)
    ours, base = results["ours"], results["baseline"]
    flops = base["flops"]
    cuda = ours["device"] != "cpu"
    print(f"config: {args.arch}/{args.patch_size}, crops 2x{args.global_size} + {args.local_crops_number}x"
          f"{args.local_size}, batch {args.batch_size}, precision {ours['precision']} (baseline fp32), "
          f"compile {'on' if args.compile else 'off'}, device {ours['device']}, torch {torch.__version__}, "
          f"{args.steps} steps after {args.warmup} warm-up, median of {args.reps} interleaved runs")
    if args.data:
        print(f"data: {args.data}, loaders included, {args.num_workers} worker(s) each; ours "
              f"{'--gpu_augment (photometric stage on the device)' if args.gpu_augment else 'CPU pipeline'}")
    print(f"FLOPs per step (student fwd+bwd, teacher fwd): {flops / 1e9:.2f} GFLOP")
    memory_label = "peak alloc MiB" if cuda else "peak RSS MiB*"
    print(f"{'path':<10}{'samples/s':>11}{'step ms':>10}{memory_label:>16}{'MFU':>7}")
    for path, r in results.items():
        print(f"{path:<10}{r['samples_s']:>11.1f}{r['step_ms']:>10.1f}{r['memory'] / 2**20:>16.0f}{mfu(flops, r):>7}")
    memory_ratio = f"{ours['memory'] / base['memory']:.2f}x" if base["memory"] > 0 else "n/a"
    print(f"ours/baseline: throughput {ours['samples_s'] / base['samples_s']:.2f}x, memory {memory_ratio}")
    if not cuda:
        print("* growth of the process's peak resident set size (resource.getrusage), each path in its own process")
        if args.threads == 1 and not args.data:  # one thread, no loader workers: CPU time is all the work
            print(f"per CPU-second of the process (robust to other load): ours {ours['samples_cpu_s']:.2f}, "
                  f"baseline {base['samples_cpu_s']:.2f} samples, {ours['samples_cpu_s'] / base['samples_cpu_s']:.2f}x")


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
