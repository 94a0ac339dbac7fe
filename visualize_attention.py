"""Self-attention of the [CLS] token in a ViT's last block, one map per head (DINO's visualize_attention.py), for an
image of any size and aspect: it is resized with its aspect kept (never squashed to a square) and cropped to whole
patches.

Writes to --output_dir: img.png (the image the model saw), attn-head<j>.png per head, attn-heads.png (every head over
the image in one figure) and, with --threshold, mask_th<threshold>_head<j>.png (the patches holding that fraction of
the head's attention). Offline: without --image_path a picture of the embedded data set is used.

    python visualize_attention.py --pretrained_weights runs/dino/checkpoint.pth --image_path cat.jpg --threshold 0.6
"""
import argparse
from pathlib import Path

from core.attention_maps import (add_attention_model_args, attention_model, cls_attention, colorize, head_colors,
                                 mask_picture, prepare, save_heads_figure, save_picture, threshold_masks, upsample)
from core.device import DEVICES, PRECISIONS, resolve_device, resolve_precision
from core.errors import UserError, run_cli
from core.log import setup_logger
from core.synthetic import ensure_default_data
from core.video import read_image

SAMPLE = ("val", "star")  # the embedded data set's picture used when no --image_path is given


def get_args_parser():
    p = argparse.ArgumentParser("Visualize Self-Attention maps", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_attention_model_args(p)
    p.add_argument("--image_path", default=None, type=str,
                   help="Image to visualize; default: a picture of the embedded data set.")
    p.add_argument("--image_size", default=(480, 480), type=int, nargs="+",
                   help="Two numbers: the box (height width) the image is fitted in, its aspect kept (the original "
                        "resized to exactly that size); one number: the short side, as in the original.")
    p.add_argument("--output_dir", default=".", help="Path where to save visualizations.")
    p.add_argument("--threshold", type=float, default=None,
                   help="Also save masks of the patches keeping this fraction of each head's attention mass.")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto picks CUDA when present, else CPU.")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="Autocast for the model: auto is bf16 on CUDA GPUs that support it (else fp16), "
                        "fp32 on CPU.")
    return p


def sample_image():
    folder = ensure_default_data().joinpath(*SAMPLE)
    return next(iter(sorted(folder.glob("*.png"))))


def main(args):
    if len(args.image_size) not in (1, 2):
        raise UserError(f"--image_size takes one or two numbers (height width), got {len(args.image_size)}")
    if args.threshold is not None and not 0 < args.threshold < 1:
        raise UserError(f"--threshold {args.threshold} is not a fraction of the attention mass: use a value in (0, 1)")
    log = setup_logger()
    image_path = Path(args.image_path) if args.image_path else sample_image()
    if not image_path.is_file():
        raise UserError(f"image {image_path} does not exist: check --image_path")
    rgb = read_image(image_path)
    device = resolve_device(args.device)
    precision = resolve_precision(device, args.precision)
    model = attention_model(args, device).eval()
    size = args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size)
    picture, images = prepare(rgb, model.patch_size, size)
    attention = cls_attention(model, images, device, precision)
    maps = upsample(attention, model.patch_size).numpy()
    out = Path(args.output_dir)
    written = [save_picture(picture, out / "img.png")]
    written += [save_picture(colorize(m), out / f"attn-head{j}.png") for j, m in enumerate(maps)]
    written.append(save_heads_figure(picture, maps, out / "attn-heads.png"))
    if args.threshold is not None:
        masks = upsample(threshold_masks(attention, args.threshold), model.patch_size).numpy() > 0.5
        written += [save_picture(mask_picture(picture, m, c), out / f"mask_th{args.threshold}_head{j}.png")
                    for j, (m, c) in enumerate(zip(masks, head_colors(len(masks))))]
    log.info(f"{image_path} at {picture.shape[1]}x{picture.shape[0]} px, {len(maps)} heads: wrote {len(written)} "
             f"pictures to {out}")
    return written


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
