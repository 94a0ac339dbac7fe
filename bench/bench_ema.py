"""Teacher EMA update time: the fused C++ op of ema/ and our foreach fallback against the original per-parameter loop.

The parameters are those of a DINO student and teacher (ViT-S/16 and a 65536-wide head by default, 43 M each). Paths:
  original  the loop of facebookresearch/dino: param_k.data.mul_(m).add_((1 - m) * param_q.detach().data) for
            each parameter pair (one temporary per parameter, and three passes over memory);
  foreach   core.dino.ema_update's fallback: _foreach_mul_ then _foreach_add_(alpha=1 - m) over all parameters;
  fused     torch.ops.dinossl.ema_update_ (`make -C ema`): one pass reading teacher and student, writing teacher.
The fused and foreach teachers must be bit-identical after the same updates; the script checks it.

    python bench/bench_ema.py                       # CPU, under a minute (--threads 1 on a busy machine)
    python bench/bench_ema.py --device cuda --steps 50
"""
import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from core.custom_ops import has_fused  # noqa: E402
from core.device import resolve_device, synchronize  # noqa: E402
from core.dino import DINOHead, MultiCropWrapper  # noqa: E402
from core.errors import run_cli  # noqa: E402
from core.vision_transformer import build_vit  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser("bench_ema", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_small", type=str)
    p.add_argument("--patch_size", default=16, type=int)
    p.add_argument("--out_dim", default=65536, type=int, help="DINO head output dimension (recipe: 65536).")
    p.add_argument("--momentum", default=0.996, type=float)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", default=0, type=int, help="CPU threads (0: torch's default).")
    p.add_argument("--steps", default=10, type=int, help="Timed updates per path, the paths taking turns.")
    p.add_argument("--warmup", default=2, type=int, help="Untimed updates first.")
    return p


def original_update(teacher, student, m):
    for param_q, param_k in zip(student.parameters(), teacher.parameters()):
        param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)


def foreach_update(teacher, student, m):
    t = list(teacher.parameters())
    torch._foreach_mul_(t, m)
    torch._foreach_add_(t, [p.detach() for p in student.parameters()], alpha=1 - m)


def fused_update(teacher, student, m):
    torch.ops.dinossl.ema_update_(list(teacher.parameters()), [p.detach() for p in student.parameters()], m)


@torch.no_grad()
def median_ms(paths, teachers, student, args, device):
    """Median time of one update per path, the paths taking turns so that a change in machine load hits all alike."""
    times = {name: [] for name in paths}
    for i in range(args.warmup + args.steps):
        for name, update in paths.items():
            synchronize(device)
            start = time.perf_counter()
            update(teachers[name], student, args.momentum)
            synchronize(device)
            if i >= args.warmup:
                times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}


def main(args):
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vit = build_vit(args.arch, args.patch_size)
    student = MultiCropWrapper(vit, DINOHead(vit.embed_dim, args.out_dim)).to(device)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p), alpha=0.01)
    n_params = sum(p.numel() for p in teacher.parameters())
    paths = {"original": original_update, "foreach": foreach_update}
    if has_fused("ema", "ema_update_", device.type):
        paths["fused"] = fused_update
    else:
        print(f"fused: not built for {device.type}, so only the PyTorch paths run (build it with make -C ema)")
    results = {name: copy.deepcopy(teacher) for name in paths}
    times = median_ms(paths, results, student, args, device)
    print(f"config: {args.arch}/{args.patch_size} + DINO head ({args.out_dim}), {n_params / 1e6:.1f} M parameters "
          f"per network, {device.type}, {torch.get_num_threads()} threads, momentum {args.momentum}")
    print(f"{'path':<10}{'median ms':>11}{'GB/s*':>8}{'vs original':>13}")
    for name, ms in times.items():
        print(f"{name:<10}{ms:>11.1f}{3 * 4 * n_params / ms / 1e6:>8.1f}{times['original'] / ms:>12.2f}x")
    print("* effective bandwidth: one read of teacher and student and one write of teacher per update, fp32")
    if "fused" in results:
        same = all(torch.equal(a, b) for a, b in zip(results["fused"].parameters(), results["foreach"].parameters()))
        print(f"fused teacher bit-identical to foreach after {args.warmup + args.steps} updates: {same}")


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
