"""Retrieval feature extraction speed (eval_image_retrieval.py), images/s, ours against the original's way, same run.

Images: JPEG files of Revisited Oxford's two shapes (1024x768 and 768x1024, mixed), generated into a temporary
folder, or the images of --data_path. Both paths decode with PIL, shrink with PIL's thumbnail to --imsize and use the
same data-loading workers, so they differ only where the original and ours differ:
  ours:     images of the same size batched together (--batch_size), SDPA attention under autocast at --precision
            (fp32 on CPU), core.features.extract_list_features;
  baseline: the original's loop: one image per step (batch size 1), its forward (explicit softmax attention, every
            token through every block), fp32, torchvision's ToTensor + Normalize, features written by index.
Both must give the same features; the script checks it.

    python bench/bench_retrieval.py                          # CPU-sized default, well under a minute
    python bench/bench_retrieval.py --n_images 1000 --arch vit_base --patch_size 8 --batch_size 64 --multiscale
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import transforms as T  # noqa: E402

from bench.bench_dino import original_forward  # noqa: E402
from core.data import list_images  # noqa: E402
from core.device import resolve_device, resolve_precision, synchronize  # noqa: E402
from core.errors import UserError, run_cli  # noqa: E402
from core.features import ImageList, extract_list_features  # noqa: E402
from core.retrieval import MULTISCALES, multiscale, retrieval_transform  # noqa: E402
from core.vision_transformer import build_vit  # noqa: E402
from eval_image_retrieval import size_key  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser("bench_retrieval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_small", type=str)
    p.add_argument("--patch_size", default=16, type=int)
    p.add_argument("--imsize", default=224, type=int, help="Longer side after the thumbnail (DINO's default).")
    p.add_argument("--n_images", default=24, type=int, help="Generated images (without --data_path).")
    p.add_argument("--data_path", default=None, type=str, help="A folder of images to use instead.")
    p.add_argument("--batch_size", default=16, type=int, help="Our path's images per batch (same-size images).")
    p.add_argument("--num_workers", default=2, type=int, help="Data-loading workers, both paths.")
    p.add_argument("--multiscale", action="store_true", help="Both paths at scales 1, 1/sqrt(2), 1/2.")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="Our path's precision (auto: the device's mixed precision on CUDA, fp32 on CPU); the "
                        "baseline is fp32.")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", default=None, type=int, help="torch CPU threads (default: torch's choice).")
    return p


def oxford_like_images(folder, n):
    """Smooth random pictures of Oxford's two shapes, saved as JPEG like the originals."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        size = (1024, 768) if i % 3 else (768, 1024)
        small = rng.integers(0, 256, (12, 16, 3) if size[0] > size[1] else (16, 12, 3), dtype=np.uint8)
        path = Path(folder) / f"{i:05d}.jpg"
        Image.fromarray(small).resize(size, Image.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


class OriginalDataset(torch.utils.data.Dataset):
    """The original's OxfordParisDataset item: open, RGB, thumbnail, then ToTensor + Normalize."""

    def __init__(self, paths, imsize):
        self.paths, self.imsize = paths, imsize
        self.transform = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        with open(self.paths[index], "rb") as f:
            image = Image.open(f).convert("RGB")
        image.thumbnail((self.imsize, self.imsize), Image.LANCZOS)
        return self.transform(image), index


def original_multiscale(model, x):
    v = None
    for s in MULTISCALES:
        scaled = x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        feats = original_forward(model, scaled)
        v = feats if v is None else v + feats
    v = v / 3
    return v / v.norm()


@torch.no_grad()
def baseline_features(model, paths, args, device):
    loader = torch.utils.data.DataLoader(OriginalDataset(paths, args.imsize), batch_size=1,
                                         num_workers=args.num_workers)
    features = None
    for x, index in loader:
        x = x.to(device)
        feats = original_multiscale(model, x) if args.multiscale else original_forward(model, x)
        if features is None:
            features = torch.zeros(len(paths), feats.shape[-1], device=device)
        features.index_copy_(0, index.to(device), feats)
    return features.cpu()


def ours_features(model, paths, args, device, precision):
    embed = (lambda x: multiscale(model, x)) if args.multiscale else model
    dataset = ImageList(paths, retrieval_transform(args.imsize))
    keys = [size_key(p) for p in paths]
    return extract_list_features(embed, dataset, keys, device, precision, args.batch_size, args.num_workers)


def main(args):
    device = resolve_device(args.device)
    precision = resolve_precision(device, args.precision)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_vit(args.arch, args.patch_size).to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        paths = list_images(args.data_path) if args.data_path else oxford_like_images(tmp, args.n_images)
        if not paths:
            raise UserError(f"no images in {args.data_path}: give a folder of images")
        warm = paths[:4]
        model.fused_attn = False
        baseline_features(model, warm, args, device)
        synchronize(device)
        start = time.perf_counter()
        base = baseline_features(model, paths, args, device)
        synchronize(device)
        base_s = time.perf_counter() - start
        model.fused_attn = True
        ours_features(model, warm, args, device, precision)
        synchronize(device)
        start = time.perf_counter()
        ours = ours_features(model, paths, args, device, precision)
        synchronize(device)
        ours_s = time.perf_counter() - start
    n = len(paths)
    same = torch.allclose(F.normalize(ours, dim=1), F.normalize(base, dim=1), atol=1e-3 if precision == "fp32"
                          else 2e-2)
    print(f"retrieval feature extraction, {args.arch}/{args.patch_size}, longer side {args.imsize}"
          f"{', multiscale' if args.multiscale else ''}, {n} images, {args.num_workers} workers, {device}"
          f"{f' ({torch.get_num_threads()} threads)' if device.type == 'cpu' else ''}:")
    print(f"  ours (size batches of {args.batch_size}, SDPA, {precision}) {n / ours_s:8.1f} img/s | baseline "
          f"(one image per step, explicit attention, fp32) {n / base_s:8.1f} img/s | ratio {base_s / ours_s:.2f}x | "
          f"same features: {same}")


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
