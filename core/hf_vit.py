"""Google's ViT weights, as a Hugging Face `transformers` folder or as the original JAX `.npz` file, in our ViT's
state-dict layout (the DINO one), so that every `--pretrained_weights` and `--finetune` takes them.

Every source tensor is accounted for: the backbone's are converted, the pooler, pre-logits and classifier are
dropped and logged, and anything else stops the load with its name, so another kind of model is never half loaded.
Nothing is downloaded: a hub name is looked up in the local Hugging Face cache only.
"""
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from core.errors import UserError
from core.log import setup_logger

HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HF_INDEX = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".npz", ".ckpt", ".tar")
HUB_NAME = re.compile(r"[\w-][\w.-]*/[\w.-]+")
# transformers' ViTModel names as the files on the hub spell them, then those of its in-memory modules since v5.
HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.mask_token": "mask_token",
    "embeddings.patch_embeddings.projection": "patch_embed.proj",
    "layernorm": "norm",
}
HF_BLOCK = {
    "layernorm_before": "norm1",
    "attention.attention.query": "attn.q", "attention.q_proj": "attn.q",
    "attention.attention.key": "attn.k", "attention.k_proj": "attn.k",
    "attention.attention.value": "attn.v", "attention.v_proj": "attn.v",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1", "mlp.fc1": "mlp.fc1",
    "output.dense": "mlp.fc2", "mlp.fc2": "mlp.fc2",
}
HF_BLOCK_KEY = re.compile(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)")
HF_DROPPED = ("pooler.", "classifier.")
# Google's vision_transformer checkpoints (flax module names); kernels are (in, out), attention ones split by head.
NPZ_TOP = {
    "embedding": "patch_embed.proj",
    "cls": "cls_token",
    "Transformer/posembed_input/pos_embedding": "pos_embed",
    "Transformer/encoder_norm": "norm",
}
NPZ_BLOCK = {
    "LayerNorm_0": "norm1",
    "MultiHeadDotProductAttention_1/query": "attn.q",
    "MultiHeadDotProductAttention_1/key": "attn.k",
    "MultiHeadDotProductAttention_1/value": "attn.v",
    "MultiHeadDotProductAttention_1/out": "attn.proj",
    "LayerNorm_2": "norm2",
    "MlpBlock_3/Dense_0": "mlp.fc1",
    "MlpBlock_3/Dense_1": "mlp.fc2",
}
NPZ_BLOCK_KEY = re.compile(r"Transformer/encoderblock_(\d+)/(.+)/(kernel|bias|scale)")
NPZ_PARAM = {"kernel": "weight", "scale": "weight", "bias": "bias"}
NPZ_DROPPED = ("pre_logits/", "head/")


def is_foreign(path):
    """A Hugging Face folder, a Google .npz, or a hub name (which then must be in the local cache)."""
    path = Path(path)
    return path.is_dir() or path.suffix == ".npz" or (not path.exists() and is_hub_name(str(path)))


def is_hub_name(name):
    return HUB_NAME.fullmatch(name) is not None and not name.endswith(WEIGHT_SUFFIXES)


def hub_cache_dir():
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def local_copy(name):
    """The folder of a hub model already in the Hugging Face cache (the snapshot `main` points to, else the newest)."""
    repo = hub_cache_dir() / f"models--{name.replace('/', '--')}"
    ref = repo / "refs" / "main"
    snapshots = [repo / "snapshots" / ref.read_text().strip()] if ref.is_file() else []
    snapshots += sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
    found = next((s for s in snapshots if (s / "config.json").is_file()), None)
    if found is None:
        raise UserError(f"{name} is neither a local file or folder nor in the Hugging Face cache {hub_cache_dir()}, "
                        f"and nothing is downloaded: check the path, or put the hub model's config.json and "
                        f"model.safetensors in a folder (e.g. `huggingface-cli download {name} --local-dir DIR`) and "
                        f"pass that folder")
    return found


def read_foreign(path, load_file):
    """(state dict in our layout, source facts for the model builder) of an HF folder, hub name or Google .npz.

    load_file is the project's one checkpoint reader (passed in, as it lives in core.checkpoint, which calls us)."""
    path = Path(path)
    if path.suffix == ".npz":
        return from_google_npz(read_npz(path), path), {}
    folder = path if path.is_dir() else local_copy(str(path))
    config = read_config(folder)
    files = [folder / f for f in HF_WEIGHTS if (folder / f).is_file()]
    if not files and (folder / HF_INDEX).is_file():
        shards = set(json.loads((folder / HF_INDEX).read_text()).get("weight_map", {}).values())
        files = [folder / f for f in sorted(shards)]
    if not files:
        raise UserError(f"{folder} has no {' or '.join(HF_WEIGHTS)}: put the model's weights file next to its "
                        f"config.json")
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
    # HF's ViT normalises with eps 1e-12 (ours 1e-6): the model builder takes the source's, so outputs match HF's.
    return from_hf(tensors, config, folder), {"layer_norm_eps": config.get("layer_norm_eps", 1e-12)}


def read_config(folder):
    file = folder / "config.json"
    if not file.is_file():
        raise UserError(f"{folder} is a folder without config.json: pass a checkpoint file, or a Hugging Face ViT "
                        f"folder (config.json and model.safetensors or pytorch_model.bin)")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file} is not valid JSON ({e}): download the model's config.json again") from e
    if config.get("model_type") != "vit":
        raise UserError(f"{folder} holds a '{config.get('model_type')}' model: only Hugging Face ViTs (model_type vit, "
                        f"e.g. google/vit-base-patch16-224-in21k) are converted")
    if config.get("hidden_act", "gelu") != "gelu":
        raise UserError(f"{folder}: activation '{config['hidden_act']}' differs from our ViT's exact GELU: "
                        f"this model cannot be converted")
    return config


def read_npz(path):
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: check the path")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}): is it a Google ViT .npz checkpoint?") from e


def from_hf(tensors, config, source):
    """transformers ViTModel / ViTForImageClassification tensors -> our layout."""
    sd, dropped, unknown = {}, [], []
    for key, value in tensors.items():
        key = key.removeprefix("vit.")
        block = HF_BLOCK_KEY.fullmatch(key)
        name, param = key.rsplit(".", 1) if "." in key else (key, "")
        if key.startswith(HF_DROPPED):
            dropped.append(key)
        elif block and block[2] in HF_BLOCK:
            sd[f"blocks.{block[1]}.{HF_BLOCK[block[2]]}.{block[3]}"] = value
        elif key in HF_TOP:
            sd[HF_TOP[key]] = value.reshape(1, -1) if key == "embeddings.mask_token" else value
        elif name in HF_TOP and param in ("weight", "bias"):
            sd[f"{HF_TOP[name]}.{param}"] = value
        else:
            unknown.append(key)
    return finish(sd, dropped, unknown, source)


def from_google_npz(arrays, source):
    """Google vision_transformer .npz arrays -> our layout: kernels transposed to (out, in), the patch kernel from
    HWIO to OIHW, the per-head attention kernels flattened."""
    prefix = "opt/target/" if any(k.startswith("opt/target/") for k in arrays) else ""
    sd, dropped, unknown = {}, [], []
    for key, value in arrays.items():
        key = key.removeprefix(prefix)
        name, param = key.rsplit("/", 1) if "/" in key else (key, "")
        block = NPZ_BLOCK_KEY.fullmatch(key)
        value = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        if key.startswith(NPZ_DROPPED):
            dropped.append(key)
        elif block and block[2] in NPZ_BLOCK:
            target = NPZ_BLOCK[block[2]]
            sd[f"blocks.{block[1]}.{target}.{NPZ_PARAM[block[3]]}"] = npz_linear(value, block[3], target)
        elif key in NPZ_TOP:
            sd[NPZ_TOP[key]] = value
        elif name in NPZ_TOP and param in NPZ_PARAM:
            sd[f"{NPZ_TOP[name]}.{NPZ_PARAM[param]}"] = value.permute(3, 2, 0, 1) if value.ndim == 4 else value
        else:
            unknown.append(key)
    return finish(sd, dropped, unknown, source)


def npz_linear(value, param, target):
    """A flax Dense / attention parameter as torch.nn.Linear's: the output projection's kernel is (heads, head_dim,
    dim), the q/k/v kernels (dim, heads, head_dim) and their biases (heads, head_dim)."""
    if param != "kernel":
        return value.reshape(-1)
    if target == "attn.proj":
        return value.reshape(-1, value.shape[-1]).t()
    return value.reshape(value.shape[0], -1).t()


def finish(sd, dropped, unknown, source):
    """Stop on unaccounted tensors, fuse q, k and v into our qkv, and log what was dropped."""
    if unknown:
        raise UserError(f"{source} holds tensors that are not part of a plain ViT: {', '.join(sorted(unknown)[:5])}"
                        f"{' ...' if len(unknown) > 5 else ''}; only ViT backbones (with pooler or classifier) convert")
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.")})
    for i in blocks:
        parts = [sd.pop(f"blocks.{i}.attn.{p}.weight", None) for p in "qkv"]
        biases = [sd.pop(f"blocks.{i}.attn.{p}.bias", None) for p in "qkv"]
        if any(p is None for p in parts):
            raise UserError(f"{source}: block {i} lacks its query, key or value weights: the file is incomplete")
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat(parts)
        # qkv_bias=False sources: a zero bias computes the same function in our always-biased layer
        sd[f"blocks.{i}.attn.qkv.bias"] = torch.cat([b if b is not None else torch.zeros(len(w))
                                                     for b, w in zip(biases, parts)])
    if dropped:
        setup_logger().info(f"{source}: dropped {len(dropped)} tensor(s) our backbone has no use for: "
                            f"{', '.join(sorted(dropped))}")
    return sd
