"""Self-attention video (DINO's video_generation.py): the [CLS] attention of a ViT's last block, averaged over heads,
as an inferno heat map blended over each frame of a video file or a folder of frames, written as mp4 (or avi).

Frames stream through one at a time: decoded, run through the model, written to the video and to
<output_path>/attention/attn-<frame>.jpg, then dropped, so memory does not grow with the video's length. The video
<output_path>/video.<format> appears only once complete. --video_only turns a folder of attn-*.jpg into a video.

    python video_generation.py --pretrained_weights runs/dino/checkpoint.pth --input_path clip.mp4 --output_path out
    python video_generation.py --input_path frames/ --resize 480 --fps 25 --output_path out
"""
import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from core.attention_maps import (add_attention_model_args, attention_model, blend, cls_attention, colorize, prepare,
                                 save_picture, upsample)
from core.checkpoint import check_writable
from core.device import DEVICES, PRECISIONS, resolve_device, resolve_precision
from core.errors import UserError, run_cli
from core.log import setup_logger
from core.video import FORMATS, VideoWriter, read_frames


def get_args_parser():
    p = argparse.ArgumentParser("Generation self-attention video", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_attention_model_args(p)
    p.add_argument("--input_path", required=True, type=str,
                   help="A video file, a folder of frames, or (with --video_only) a folder of attention images.")
    p.add_argument("--output_path", default="./", type=str,
                   help="Folder for video.<format> and attention/ (default: the current folder).")
    p.add_argument("--threshold", type=float, default=0.6,
                   help="Accepted for the original's command lines: its video shows the plain heat map, the mask "
                        "it computed with this fraction went unused, and so it does here.")
    p.add_argument("--resize", default=None, type=int, nargs="+",
                   help="Resize frames first, aspect kept: one number sets the short side, two (height width) a box "
                        "the frame is fitted in (the original resized to exactly that size). Use if memory runs out.")
    p.add_argument("--video_only", action="store_true",
                   help="Only turn the attn-*.jpg images of --input_path (e.g. out/attention/) into a video.")
    p.add_argument("--fps", default=30.0, type=float,
                   help="Frames per second of the video written; a video input sets it to its own rate.")
    p.add_argument("--video_format", default="mp4", type=str, choices=FORMATS, help="Format of the video written.")
    p.add_argument("--blend", default=0.5, type=float,
                   help="Weight of the heat map over the frame (1: the heat map alone, as the original).")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto picks CUDA when present, else CPU.")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="Autocast for the model: auto is bf16 on CUDA GPUs that support it (else fp16), "
                        "fp32 on CPU.")
    return p


def attention_frame(model, rgb, resize, alpha, device, precision):
    """The frame cropped to whole patches with its head-averaged attention blended over it."""
    picture, images = prepare(rgb, model.patch_size, resize)
    attention = cls_attention(model, images, device, precision).mean(dim=0, keepdim=True)
    return blend(picture, colorize(upsample(attention, model.patch_size)[0].numpy(), "inferno"), alpha)


def progress(frames, desc):
    return tqdm(frames, desc=desc, unit="frame", file=sys.stdout, dynamic_ncols=True, leave=False)


def main(args):
    if args.resize is not None and len(args.resize) not in (1, 2):
        raise UserError(f"--resize takes one number (short side) or two (height width), got {len(args.resize)}")
    if not 0 <= args.blend <= 1 or args.fps <= 0:
        raise UserError("--blend must lie in [0, 1] and --fps be positive: fix the value")
    log = setup_logger()
    out = Path(args.output_path)
    video = out / f"video.{args.video_format}"
    if args.video_only:
        _, frames = read_frames(args.input_path, "attn-*")
        with VideoWriter(video, args.fps, args.video_format) as writer:
            for _, rgb in progress(frames, "video"):
                writer.write(rgb)
        log.info(f"wrote {video}: {writer.frames} frames at {args.fps:g} fps")
        return video
    rate, frames = read_frames(args.input_path)  # a file that is no video stops here, before any output
    fps = rate or args.fps
    device = resolve_device(args.device)
    precision = resolve_precision(device, args.precision)
    model = attention_model(args, device).eval()
    resize = None if args.resize is None else (args.resize[0] if len(args.resize) == 1 else tuple(args.resize))
    check_writable(out)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".attention."))
    try:
        with VideoWriter(video, fps, args.video_format) as writer:
            for name, rgb in progress(frames, "attention"):
                picture = attention_frame(model, rgb, resize, args.blend, device, precision)
                save_picture(picture, staging / f"attn-{name}.jpg", "JPEG")
                writer.write(picture)
        (out / "attention").mkdir(exist_ok=True)
        for f in sorted(staging.iterdir()):
            os.replace(f, out / "attention" / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(f"wrote {video}: {writer.frames} frames at {fps:g} fps, and their pictures in {out / 'attention'}")
    return video


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
