"""Export the backbone of a training checkpoint as a plain state dict (.pth and/or .safetensors), the form that
eval scripts, timm and other tools load. The backbone is first rebuilt and loaded with strict=True, so a file that
is written also loads.

    python export_weights.py runs/dino/checkpoint.pth                      # teacher -> *_backbone.{pth,safetensors}
    python export_weights.py ckpt.pth --checkpoint_key student --output vits16.safetensors --layout timm
"""
import argparse
from pathlib import Path

from core.checkpoint import save_checkpoint, to_timm_layout
from core.errors import UserError, run_cli
from core.features import build_backbone
from core.log import setup_logger

SUFFIXES = (".pth", ".safetensors")


def get_args_parser():
    p = argparse.ArgumentParser("Export backbone weights", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=str, help="Training checkpoint or any supported backbone file.")
    p.add_argument("--checkpoint_key", default="teacher", type=str,
                   help='Entry of a full checkpoint holding the backbone (e.g. "teacher", "student").')
    p.add_argument("--output", default=None, type=str, nargs="+",
                   help="Files to write, .pth or .safetensors; default: <checkpoint>_<key>_backbone.pth and "
                        ".safetensors beside the checkpoint.")
    p.add_argument("--layout", default="dino", choices=["dino", "timm"],
                   help="dino: our and the official DINO/DINOv2 keys (the same as timm's for ViTs without "
                        "registers); timm: the keys of timm's matching model (registers as reg_token).")
    p.add_argument("--arch", default=None, type=str, help="Architecture; default: read from the checkpoint.")
    p.add_argument("--patch_size", default=None, type=int, help="Patch size; default: read from the checkpoint.")
    return p


def write_safetensors(tensors, f):
    from safetensors.torch import save

    f.write(save(tensors))


def export_state_dict(model, layout="dino"):
    """Plain, unshared tensors (safetensors refuses views), in the chosen key layout."""
    state_dict = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if layout == "timm":
        state_dict = {k.removeprefix("model."): v for k, v in to_timm_layout(state_dict).items()}
        state_dict = {k: v.contiguous() for k, v in state_dict.items()}
    return state_dict


def output_paths(args):
    if args.output:
        bad = [o for o in args.output if Path(o).suffix not in SUFFIXES]
        if bad:
            raise UserError(f"--output {bad[0]}: the name must end in .pth or .safetensors")
        return [Path(o) for o in args.output]
    stem = Path(args.checkpoint).with_suffix("")
    return [Path(f"{stem}_{args.checkpoint_key}_backbone{suffix}") for suffix in SUFFIXES]


def main(args):
    log = setup_logger()
    outputs = output_paths(args)
    model, description = build_backbone(args.checkpoint, args.checkpoint_key, args.arch, args.patch_size)
    state_dict = export_state_dict(model, args.layout)
    for path in outputs:
        save_checkpoint(state_dict, path, write_safetensors if path.suffix == ".safetensors" else None)
        log.info(f"wrote {path} ({description}, {len(state_dict)} tensors, {args.layout} layout)")
    return outputs


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
