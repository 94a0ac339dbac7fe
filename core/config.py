"""Named configurations from configs.yml: `--config NAME` sets an entry point's defaults, flags still override."""
import argparse
import os
from pathlib import Path

import torch
import yaml

from core.errors import UserError

CONFIG_FILE = Path(__file__).resolve().parents[1] / "configs.yml"
# The MAE originals' --model names as our size flags. ViT-H is ViT-L's code with ViT-H's sizes (1280 wide, 32 blocks,
# 16 heads, 14 px patches); every MAE model has the same decoder (512 wide, 8 blocks, 16 heads).
VIT_MODELS = {
    "vit_base_patch16": {"arch": "vit_base", "patch_size": 16, "embed_dim": None, "depth": None, "num_heads": None},
    "vit_large_patch16": {"arch": "vit_large", "patch_size": 16, "embed_dim": None, "depth": None, "num_heads": None},
    "vit_huge_patch14": {"arch": "vit_large", "patch_size": 14, "embed_dim": 1280, "depth": 32, "num_heads": 16},
}
MAE_MODELS = {f"mae_{name}": {**sizes, "decoder_embed_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16}
              for name, sizes in VIT_MODELS.items()}


def bool_flag(s):
    """argparse type for true/false flags written as values, as in the official DINO scripts."""
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{s}'")


def add_launcher_args(parser, local_rank=0):
    """The originals' distributed flags, so that their command lines run unchanged, including under
    `python -m torch.distributed.launch`, which appends --local-rank=N (older versions --local_rank=N)."""
    parser.add_argument("--dist_url", default="env://", type=str,
                        help="How the processes meet: env:// reads torchrun's or SLURM's variables (always used "
                             "here); tcp://HOST:PORT sets MASTER_ADDR and MASTER_PORT first.")
    parser.add_argument("--local_rank", "--local-rank", default=local_rank, type=int,
                        help="Set by python -m torch.distributed.launch: it becomes LOCAL_RANK when the launcher "
                             "did not export it. Do not set it yourself.")


def add_mae_launcher_args(parser):
    """MAE's distributed flags: DINO's, with MAE's --local_rank default, --world_size and --dist_on_itp."""
    add_launcher_args(parser, local_rank=-1)
    parser.add_argument("--world_size", default=1, type=int,
                        help="Accepted for MAE command lines; the number of processes is read from torchrun "
                             "(WORLD_SIZE) or SLURM (SLURM_NTASKS).")
    parser.add_argument("--dist_on_itp", action="store_true",
                        help="On Microsoft ITP clusters (OpenMPI), take rank, world size and local rank from "
                             "OMPI_COMM_WORLD_*; without those variables it changes nothing.")


def apply_compat_args(args):
    """Turn the originals' flags into ours: the launcher flags into the environment core.distributed reads,
    --use_fp16 into --precision, an MAE --model name into the size flags."""
    if getattr(args, "dist_on_itp", False) and "OMPI_COMM_WORLD_RANK" in os.environ:
        for ours, theirs in (("RANK", "RANK"), ("WORLD_SIZE", "SIZE"), ("LOCAL_RANK", "LOCAL_RANK")):
            os.environ[ours] = os.environ[f"OMPI_COMM_WORLD_{theirs}"]
    if getattr(args, "local_rank", -1) >= 0 and "RANK" in os.environ:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    url = getattr(args, "dist_url", "env://")
    if url.startswith("tcp://"):
        host, _, port = url[len("tcp://"):].rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"--dist_url {url} is not tcp://HOST:PORT: fix it or use env://")
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = host, port
    elif url != "env://":
        raise UserError(f"--dist_url {url} is not supported: use env:// (torchrun, SLURM) or tcp://HOST:PORT")
    if getattr(args, "use_fp16", None) is not None:
        args.precision = use_fp16_precision(args.use_fp16, args.device)
    if getattr(args, "model", None):
        models = MAE_MODELS if hasattr(args, "decoder_embed_dim") else VIT_MODELS  # pretraining has a decoder
        if args.model not in models:
            raise UserError(f"unknown --model '{args.model}': choose one of {', '.join(models)}")
        for name, value in models[args.model].items():
            setattr(args, name, value)
    return args


def use_fp16_precision(use_fp16, device):
    """DINO's --use_fp16: true is fp16 with loss scaling where it was meant for (CUDA), the device's auto
    precision elsewhere; false is fp32."""
    if not use_fp16:
        return "fp32"
    return "fp16" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "auto"


def load_config(script, name, path=CONFIG_FILE):
    """The section `script` of configs.yml, entry `name`; or a YAML file of flag values given by its path."""
    if name.endswith((".yml", ".yaml")):
        if not Path(name).is_file():
            raise UserError(f"config file {name} does not exist: check the path")
        return yaml.safe_load(Path(name).read_text()) or {}
    configs = (yaml.safe_load(Path(path).read_text()) or {}).get(script, {})
    if name not in configs:
        raise UserError(f"unknown config '{name}' for {script}: choose one of {', '.join(configs) or 'none'} "
                        f"(see configs.yml)")
    return configs[name] or {}


def parse_args(parser, script, argv=None):
    """Parse argv with the defaults of `--config NAME` applied first; unknown keys in a config are an error.
    The originals' flags are then turned into ours (apply_compat_args)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        values = load_config(script, known.config)
        dests = {a.dest for a in parser._actions}
        unknown = sorted(set(values) - dests)
        if unknown:
            raise UserError(f"config '{known.config}' sets unknown options {unknown}: fix configs.yml")
        parser.set_defaults(**values)
    return apply_compat_args(parser.parse_args(argv))
