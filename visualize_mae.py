"""MAE reconstructions of any checkpoint with a decoder (ours or an official mae_visualize_vit_*.pth): a PNG with one
row per image: original, masked input, reconstruction with the visible patches pasted back.

    python visualize_mae.py --checkpoint runs/mae_demo/checkpoint.pth --output reconstruction.png
    python visualize_mae.py --checkpoint mae_visualize_vit_large.pth --data_path /imagenet/val --mask_ratio 0.75
"""
import argparse
from pathlib import Path

from core.device import resolve_device
from core.errors import run_cli
from core.log import setup_logger
from core.mae import check_mask_ratio, load_mae, sample_images, save_reconstruction
from core.synthetic import ensure_default_data


def get_args_parser():
    p = argparse.ArgumentParser("MAE reconstructions", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=str, help="MAE checkpoint with its decoder.")
    p.add_argument("--data_path", default=None, type=str,
                   help="Folder of images (ImageFolder or flat); omitted: the embedded data set's val split.")
    p.add_argument("--output", default="reconstruction.png", type=str, help="PNG file to write.")
    p.add_argument("--num_images", default=8, type=int, help="Images (rows) in the picture, evenly spaced.")
    p.add_argument("--mask_ratio", default=0.75, type=float, help="Fraction of patches removed.")
    p.add_argument("--seed", default=0, type=int, help="Seed of the masks.")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "hpu", "ipu"])
    return p


def main(args):
    check_mask_ratio(args.mask_ratio)
    device = resolve_device(args.device)
    model = load_mae(args.checkpoint).to(device)
    data_path = Path(args.data_path) if args.data_path else ensure_default_data() / "val"
    input_size = model.patch_embed.grid_size[0] * model.patch_size
    images = sample_images(data_path, input_size, args.num_images).to(device)
    path = save_reconstruction(model, images, args.output, args.mask_ratio, args.seed)
    setup_logger().info(f"wrote {path}: {len(images)} images from {data_path}, mask ratio {args.mask_ratio}")
    return path


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
