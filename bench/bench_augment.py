"""DINO multi-crop augmentation throughput per CPU core: ours against the original's torchvision chain, same run.

Every path decodes JPEGs (from memory) and collates batches, as a loader worker does, on one thread. Paths:
  original     facebookresearch/dino's DataAugmentationDINO rebuilt from torchvision's PIL transforms (the
               baseline): RandomResizedCrop, flip, ColorJitter, RandomGrayscale, PIL GaussianBlur and Solarization
               classes, ToTensor, Normalize;
  ours         core.augment.DataAugmentationDINO: the same PIL operations called directly, one-pass normalisation;
  gpu_cpu      the CPU side of --gpu_augment: decode, crop and flip to uint8, nothing else;
  gpu_stage    the batched photometric stage of --gpu_augment (core.gpu_augment) on --device, from uint8 crops
               already there (on a CPU: one thread, for information only).
Repetitions of the CPU paths are interleaved and medians reported, so that load from other processes hits all
of them alike; samples/s per core is computed from the thread's CPU time (wall-clock figures alongside).

    python bench/bench_augment.py                        # recipe sizes 2 x 224 + 8 x 96, about a minute
    python bench/bench_augment.py --profile              # where the time of each CPU path goes (cProfile)
"""
import argparse
import cProfile
import io
import os
import pstats
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image, ImageFilter, ImageOps  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402
from torchvision import transforms as T  # noqa: E402

from core.augment import IMAGENET_MEAN, IMAGENET_STD, DataAugmentationDINO  # noqa: E402
from core.device import resolve_device, synchronize  # noqa: E402
from core.errors import UserError, run_cli  # noqa: E402
from core.gpu_augment import GPUAugmentDINO  # noqa: E402

SHARED_DATA = Path(os.environ.get("SHARED_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def get_args_parser():
    p = argparse.ArgumentParser("bench_augment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default=str(SHARED_DATA / "imagenette-160" / "train"), type=str,
                   help="Folder of JPEGs (searched recursively); default: imagenette-160 of ../shared/data.")
    p.add_argument("--images", default=48, type=int, help="Images per repetition (spread over the folder).")
    p.add_argument("--reps", default=5, type=int, help="Interleaved repetitions of each CPU path.")
    p.add_argument("--batch_size", default=16, type=int, help="Collated batch size, and the GPU stage's batch.")
    p.add_argument("--global_size", default=224, type=int)
    p.add_argument("--local_size", default=96, type=int)
    p.add_argument("--local_crops_number", default=8, type=int)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="Device of the GPU stage.")
    p.add_argument("--gpu_batch", default=256, type=int, help="Batch of the GPU stage on CUDA (CPU: --batch_size).")
    p.add_argument("--profile", action="store_true", help="Also print each CPU path's top functions (cProfile).")
    return p


class GaussianBlur:
    """The original's utils.GaussianBlur: PIL blur, radius ~ U(0.1, 2.0), applied with probability p."""

    def __init__(self, p, scale=1.0):
        self.p, self.scale = p, scale

    def __call__(self, img):
        if random.random() <= self.p:
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0) * self.scale))
        return img


class Solarization:
    """The original's utils.Solarization: PIL solarize at 128, with probability p."""

    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


class OriginalAugmentation:
    """facebookresearch/dino's DataAugmentationDINO with torchvision's PIL transforms; the blur sigma is scaled by
    global_size / 224 as ours (1 at the recipe's sizes), so that smaller test sizes compare alike."""

    def __init__(self, global_size=224, local_size=96, local_crops_number=8):
        scale = global_size / 224
        flip_and_color_jitter = T.Compose([
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ])
        normalize = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        bicubic = T.InterpolationMode.BICUBIC
        self.global1 = T.Compose([T.RandomResizedCrop(global_size, scale=(0.4, 1.0), interpolation=bicubic),
                                  flip_and_color_jitter, GaussianBlur(1.0, scale), normalize])
        self.global2 = T.Compose([T.RandomResizedCrop(global_size, scale=(0.4, 1.0), interpolation=bicubic),
                                  flip_and_color_jitter, GaussianBlur(0.1, scale), Solarization(0.2), normalize])
        self.local = T.Compose([T.RandomResizedCrop(local_size, scale=(0.05, 0.4), interpolation=bicubic),
                                flip_and_color_jitter, GaussianBlur(0.5, scale), normalize])
        self.local_crops_number = local_crops_number

    def __call__(self, image):
        return [self.global1(image), self.global2(image)] + [self.local(image) for _ in range(self.local_crops_number)]


def load_jpegs(folder, n):
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise UserError(f"no JPEG files under {folder}: give --data_path a folder of JPEGs")
    step = max(len(files) // n, 1)
    return [f.read_bytes() for f in files[::step][:n]]


def run_path(transform, jpegs, batch_size):
    """Decode, transform and collate every image; returns (CPU seconds of this thread, wall seconds)."""
    cpu, wall = time.thread_time(), time.perf_counter()
    for start in range(0, len(jpegs), batch_size):
        batch = []
        for data in jpegs[start:start + batch_size]:
            batch.append(transform(Image.open(io.BytesIO(data)).convert("RGB")))
        default_collate(batch)
    return time.thread_time() - cpu, time.perf_counter() - wall


def gpu_stage(args, views, sigma_scale, crops, device):
    """Samples/s of the batched photometric stage on `device`, from uint8 crops already there."""
    batch = args.gpu_batch if device.type == "cuda" else args.batch_size
    repeat = -(-batch // len(crops[0]))
    crops = [c.repeat(repeat, 1, 1, 1)[:batch].to(device) for c in crops]
    augment = GPUAugmentDINO(views, sigma_scale, seed=0, batch_size=batch)
    augment(crops, step=0)
    steps = 10 if device.type == "cuda" else 2
    synchronize(device)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        augment(crops, step=step)
    synchronize(device)
    return batch * steps / (time.perf_counter() - start)


def main(args):
    if min(args.images, args.reps, args.batch_size, args.gpu_batch) < 1:
        raise UserError("--images, --reps, --batch_size and --gpu_batch must be at least 1")
    torch.set_num_threads(1)
    device = resolve_device(args.device)
    jpegs = load_jpegs(args.data_path, args.images)
    sizes = (args.global_size, args.local_size, args.local_crops_number)
    geometry = DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), args.local_crops_number, args.global_size,
                                    args.local_size, photometric=False)
    paths = {"original": OriginalAugmentation(*sizes),
             "ours": DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), args.local_crops_number, args.global_size,
                                          args.local_size),
             "gpu_cpu": geometry}
    random.seed(0)
    torch.manual_seed(0)
    for transform in paths.values():  # warm-up: imports, allocator, file cache
        run_path(transform, jpegs[:2], args.batch_size)
    times = {name: [] for name in paths}
    for _ in range(args.reps):
        for name, transform in paths.items():
            times[name].append(run_path(transform, jpegs, args.batch_size))
    per_core = {name: len(jpegs) / statistics.median(t[0] for t in ts) for name, ts in times.items()}
    wall = {name: len(jpegs) / statistics.median(t[1] for t in ts) for name, ts in times.items()}
    crops = [torch.stack(view) for view in zip(*[geometry(Image.open(io.BytesIO(d)).convert("RGB"))
                                                 for d in jpegs[:args.batch_size]])]
    stage = gpu_stage(args, geometry.views, geometry.sigma_scale, crops, device)

    print(f"config: crops 2x{args.global_size} + {args.local_crops_number}x{args.local_size}, {len(jpegs)} JPEGs "
          f"from {args.data_path}, batches of {args.batch_size}, 1 thread, median of {args.reps} interleaved "
          f"repetitions, torch {torch.__version__}")
    print(f"{'path':<12}{'samples/s/core':>16}{'wall samples/s':>16}{'vs original':>13}")
    for name in paths:
        print(f"{name:<12}{per_core[name]:>16.1f}{wall[name]:>16.1f}{per_core[name] / per_core['original']:>12.2f}x")
    where = (f"{torch.cuda.get_device_name(device)}, batch {args.gpu_batch}" if device.type == "cuda"
             else f"cpu, 1 thread, batch {args.batch_size}")
    print(f"gpu_stage: {stage:.1f} samples/s ({where})")
    print(f"ours/original: {per_core['ours'] / per_core['original']:.2f}x per core; --gpu_augment CPU side: "
          f"{per_core['gpu_cpu'] / per_core['original']:.2f}x")
    if args.profile:
        for name, transform in paths.items():
            profiler = cProfile.Profile()
            profiler.runcall(run_path, transform, jpegs, args.batch_size)
            print(f"\n--- {name}: top functions by own time")
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
