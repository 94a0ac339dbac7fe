"""Video label propagation frames/s on a real DAVIS sequence, ours against the original algorithm, same run.

Both paths get the same frames at the same resolution (short side 480, as the original) and the same patch features
of one random backbone (speed does not depend on the weights), extracted once and timed apart. Each figure is
the median time per frame, so that stalls of a shared machine stay out of it.
  ours      core.video_segmentation.LabelPropagation: neighbourhood mask built from two 1-D bands and cached per grid
            size, targets taken in bands of lines compared only with the context lines their windows reach (a ring
            buffer of context features), top-k of the masked cosines, exponentials only for the k kept;
  baseline  the original's algorithm written here: the mask filled by a Python loop over every (patch, offset) pair
            once per video, the full exp(cos / 0.1) affinity to every context patch, multiplied by the mask, top-k
            along the source axis, thresholding, normalisation, and a per-channel loop for the min-max step.
"propagation" is the label propagation of the video's frames after the first plus its neighbourhood mask (built
once per video by the original); "per frame" leaves the mask out; "end to end" adds feature extraction, upsampling
and arg-max.
Both paths must give the same masks; the script checks it.

    python bench/bench_propagation.py --threads 1           # blackswan, all 50 frames, vit_small/16, CPU: minutes
    python bench/bench_propagation.py --sequence dog --frames 30 --device cuda
"""
import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from bench.bench_eval import timed  # noqa: E402
from core.device import autocast, resolve_device, resolve_precision  # noqa: E402
from core.errors import UserError, run_cli  # noqa: E402
from core.video_segmentation import (LabelPropagation, labels_to_mask, neighbourhood_mask, one_hot_grid,  # noqa: E402
                                     patch_features, prepare_frame, read_object_mask, read_rgb)
from core.vision_transformer import build_vit  # noqa: E402

DEFAULT_DATA = Path(os.environ.get("SHARED_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def get_args_parser():
    p = argparse.ArgumentParser("bench_propagation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default=str(DEFAULT_DATA / "davis2016"), type=str,
                   help="DAVIS folder with JPEGImages/480p and Annotations/480p.")
    p.add_argument("--sequence", default="blackswan", type=str)
    p.add_argument("--frames", default=0, type=int,
                   help="Frames of the sequence used, the first one included; 0: all (blackswan has 50).")
    p.add_argument("--arch", default="vit_small", type=str)
    p.add_argument("--patch_size", default=16, type=int)
    p.add_argument("--short_side", default=480, type=int, help="The original's resolution: 480.")
    p.add_argument("--n_last_frames", default=7, type=int)
    p.add_argument("--size_mask_neighborhood", default=12, type=int)
    p.add_argument("--topk", default=5, type=int)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", default=0, type=int,
                   help="CPU threads for torch (0: its default); 1 gives steadier figures on a busy machine.")
    p.add_argument("--precision", default="fp32", choices=["auto", "fp32", "fp16", "bf16"],
                   help="Feature extraction precision (the same for both paths).")
    return p


def restrict_neighborhood_loop(h, w, size):
    """The original's mask: one Python iteration per (target patch, window offset) pair."""
    mask = torch.zeros(h, w, h, w)
    for i in range(h):
        for j in range(w):
            for p in range(2 * size + 1):
                for q in range(2 * size + 1):
                    a, b = i - size + p, j - size + q
                    if 0 <= a < h and 0 <= b < w:
                        mask[i, j, a, b] = 1
    return mask.reshape(h * w, h * w)


def original_propagation(target, context_feats, context_segs, mask, topk):
    """The original's label_propagation: target (N, d), context features (d, N), segmentations (1, C, h, w)."""
    n = len(context_feats)
    sources = F.normalize(torch.stack(context_feats), dim=1, p=2)
    target = F.normalize(target, dim=1, p=2).unsqueeze(0).repeat(n, 1, 1)
    aff = torch.exp(torch.bmm(target, sources) / 0.1)
    if mask is not None:
        aff *= mask.unsqueeze(0)
    hw = aff.shape[-1]
    aff = aff.transpose(2, 1).reshape(-1, hw)
    tk_val, _ = torch.topk(aff, dim=0, k=topk)
    tk_val_min, _ = torch.min(tk_val, dim=0)
    aff[aff < tk_val_min] = 0
    aff = aff / torch.sum(aff, keepdim=True, dim=0)
    segs = torch.cat(context_segs)
    _, c, h, w = segs.shape
    segs = segs.reshape(n, c, -1).transpose(2, 1).reshape(-1, c).T
    return torch.mm(segs, aff).reshape(1, c, h, w)


def original_mask(seg, patch_size, out_hw):
    """The original's post-processing: upsampling, a per-channel min-max loop, arg-max, nearest resize."""
    seg = F.interpolate(seg, scale_factor=patch_size, mode="bilinear", align_corners=False,
                        recompute_scale_factor=False)[0]
    for c in range(seg.shape[0]):
        if seg[c].max() > 0:
            shifted = seg[c] - seg[c].min()
            seg[c] = shifted / shifted.max()
    index = seg.argmax(dim=0).to(torch.uint8).cpu().numpy()
    return np.array(Image.fromarray(index).resize((out_hw[1], out_hw[0]), Image.NEAREST))


def per_frame(device, fns):
    """(outputs, median seconds per call): the median keeps a shared machine's stalls out of the figure."""
    outputs, seconds = zip(*(timed(device, fn) for fn in fns))
    return list(outputs), statistics.median(seconds)


def load_sequence(args):
    frames_dir = Path(args.data_path) / "JPEGImages" / "480p" / args.sequence
    frames = sorted(frames_dir.glob("*.jpg"))[:args.frames or None]
    if len(frames) < 2:
        raise UserError(f"{frames_dir} has fewer than 2 frames: set --data_path to a DAVIS folder (real data is in "
                        f"../shared/data/davis2016 or $SHARED_DATA_DIR)")
    first_mask = Path(args.data_path) / "Annotations" / "480p" / args.sequence / f"{frames[0].stem}.png"
    return frames, read_object_mask(first_mask)


def propagate_ours(features, labels, grid, args):
    propagate = LabelPropagation(features[0], labels, grid, args.n_last_frames, args.topk, args.size_mask_neighborhood)
    return [lambda f=f: propagate(f) for f in features[1:]]


def propagate_original(features, labels, grid, args, mask):
    first, queue = labels.T.reshape(1, -1, *grid), []

    def step(f):
        nonlocal queue
        seg = original_propagation(f, [features[0].T] + [q[0] for q in queue], [first] + [q[1] for q in queue],
                                   mask, args.topk)
        queue = (queue + [(f.T, seg)])[-args.n_last_frames:] if args.n_last_frames else []
        return seg

    return [lambda f=f: step(f) for f in features[1:]]


@torch.inference_mode()
def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precision = resolve_precision(device, args.precision)
    frames, first_mask = load_sequence(args)
    torch.manual_seed(0)
    model = build_vit(args.arch, args.patch_size).to(device).eval()

    def extract(path):
        image = prepare_frame(read_rgb(path), args.short_side)[None].to(device)
        with autocast(device, precision):
            return patch_features(model, image)[0]

    features, extract_s = per_frame(device, [lambda p=p: extract(p) for p in frames])
    rgb = read_rgb(frames[0])
    out_hw, size = tuple(rgb.shape[1:]), prepare_frame(rgb, args.short_side).shape[1:]
    grid = (size[0] // args.patch_size, size[1] // args.patch_size)
    labels = one_hot_grid(first_mask, grid, int(first_mask.max()) + 1).to(device)
    radius, n = args.size_mask_neighborhood, len(frames) - 1

    neighbourhood_mask.cache_clear()
    _, ours_mask_s = timed(device, lambda: neighbourhood_mask(*grid, radius, str(device)))
    mask, base_mask_s = timed(device, lambda: restrict_neighborhood_loop(*grid, radius).to(device))
    ours_labels, ours_s = per_frame(device, propagate_ours(features, labels, grid, args))
    base_labels, base_s = per_frame(device, propagate_original(features, labels, grid, args, mask))
    ours_masks, ours_post_s = per_frame(device, [lambda x=x: labels_to_mask(x, grid, args.patch_size, out_hw)
                                                 for x in ours_labels])
    base_masks, base_post_s = per_frame(device, [lambda x=x: original_mask(x.clone(), args.patch_size, out_hw)
                                                 for x in base_labels])
    diff = max((a - b.reshape(b.shape[1], -1).T).abs().max().item() for a, b in zip(ours_labels, base_labels))
    agree = sum((a == b).mean() for a, b in zip(ours_masks, base_masks)) / n

    ours_video, base_video = ours_mask_s + n * ours_s, base_mask_s + n * base_s
    print(f"{args.sequence}: {n} propagated frames at {size[1]}x{size[0]} ({grid[0]}x{grid[1]} patches), "
          f"{args.arch}/{args.patch_size}, {1 + args.n_last_frames} context frames, window {2 * radius + 1}, "
          f"top-{args.topk}, {device}, {torch.get_num_threads()} thread(s); median time per frame")
    print(f"  propagation  ours {n / ours_video:8.2f} frames/s | original algorithm {n / base_video:8.2f} frames/s | "
          f"ratio {base_video / ours_video:.1f}x  (the video's frames plus its neighbourhood mask: ours "
          f"{ours_mask_s:.3f} s, the original's loop {base_mask_s:.1f} s)")
    print(f"  per frame    ours {1 / ours_s:8.2f} frames/s | original algorithm {1 / base_s:8.2f} frames/s | "
          f"ratio {base_s / ours_s:.1f}x  (mask left out)")
    end_ours = ours_video + n * (extract_s + ours_post_s)
    end_base = base_video + n * (extract_s + base_post_s)
    print(f"  end to end   ours {n / end_ours:8.2f} frames/s | original algorithm {n / end_base:8.2f} frames/s | "
          f"ratio {end_base / end_ours:.2f}x  (with the shared feature extraction, {1 / extract_s:.2f} frames/s, "
          f"and the upsampling)")
    print(f"  same result: soft labels max abs diff {diff:.1e}, identical mask pixels {100 * agree:.3f}%")


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
