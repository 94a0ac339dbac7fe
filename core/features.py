"""Feature extraction shared by every evaluation: a frozen backbone from any supported checkpoint, a labelled dataset
run through it on this process's shard, and the features gathered back on every process in dataset order.

Features can be dumped and reloaded (DINO's trainfeat.pth, testfeat.pth, trainlabels.pth, testlabels.pth), so an
evaluation can be re-run without the backbone.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as tdist
from PIL import Image
from tqdm import tqdm

from core import distributed as dist
from core.checkpoint import (load_backbone_state, load_file, read_backbone, save_checkpoint, use_source_norm_eps,
                             vit_layout)
from core.data import ImageDataset, build_loader
from core.device import DEVICES, PRECISIONS, autocast, resolve_device, resolve_precision
from core.errors import UserError
from core.log import setup_logger
from core.synthetic import ensure_default_data
from core.vision_transformer import ARCHS, VisionTransformer, arch_sizes, build_vit

FEATURE_FILES = ("trainfeat.pth", "testfeat.pth", "trainlabels.pth", "testlabels.pth")
LAYOUT_OPTIONS = ("img_size", "init_values", "num_register_tokens", "mask_token")


def add_eval_args(parser):
    """Flags every evaluation shares: backbone, data, device and the feature dump."""
    parser.add_argument("--arch", default=None, type=str,
                        help="vit_tiny, vit_small, vit_base, vit_large or timm/<name>; default: the checkpoint's "
                             "(stored args or weight shapes), else vit_small.")
    parser.add_argument("--patch_size", default=None, type=int,
                        help="Patch size; default: the checkpoint's, else 16.")
    parser.add_argument("--pretrained_weights", default="", type=str,
                        help="Our or official DINO checkpoint, backbone-only file, timm ViT or DINOv2 state dict, "
                             "Hugging Face ViT folder (config.json + weights) or Google ViT .npz. Empty: a randomly "
                             "initialised backbone (a baseline).")
    parser.add_argument("--checkpoint_key", default="teacher", type=str,
                        help='Entry of a full checkpoint holding the backbone (e.g. "teacher", "student").')
    parser.add_argument("--data_path", default=None, type=str,
                        help="Folder with train/ and val/ ImageFolder trees; omitted: the embedded generated data.")
    parser.add_argument("--resize", default=256, type=int, help="Short side after resizing (bicubic).")
    parser.add_argument("--crop", default=224, type=int, help="Side of the centre crop.")
    parser.add_argument("--batch_size_per_gpu", default=128, type=int, help="Images per process and per step.")
    parser.add_argument("--num_workers", default=10, type=int, help="Data loading processes per GPU.")
    parser.add_argument("--device", default="auto", choices=DEVICES, help="auto picks CUDA when present, else CPU.")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="Autocast for the backbone: auto is bf16 on CUDA (fp16 without bf16), fp32 on CPU.")
    parser.add_argument("--dump_features", default=None, type=str,
                        help="Folder where the extracted train/val features and labels are saved.")
    parser.add_argument("--load_features", default=None, type=str,
                        help="Folder of features saved with --dump_features: skips the backbone and the images.")
    parser.add_argument("--seed", default=0, type=int, help="Seed (the random backbone, the linear heads).")
    return parser


def init_eval(args):
    """Device, process group and precision; the seed is shared so every process builds the same random backbone."""
    device = resolve_device(args.device, dist.world_from_env()[2])
    dist.init_distributed(device)
    torch.manual_seed(args.seed)
    return device, resolve_precision(device, args.precision)


def frozen(model):
    model.eval()
    model.requires_grad_(False)
    return model


def build_backbone(pretrained_weights=None, checkpoint_key="teacher", arch=None, patch_size=None, img_size=224):
    """(frozen backbone, one-line description). Explicit arch/patch_size win; otherwise they come from the weights'
    shapes, then from the args stored in the checkpoint. LayerScale, registers, mask token and the stored position
    grid always come from the weights, so that every supported layout loads with strict=True."""
    if not pretrained_weights:
        arch, patch_size = arch or "vit_small", patch_size or 16
        return frozen(build_vit(arch, patch_size, img_size=img_size)), f"RANDOMLY INITIALISED {arch}/{patch_size}"
    state_dict, stored = read_backbone(pretrained_weights, checkpoint_key)
    layout = vit_layout(state_dict) or {}
    arch = arch or layout.get("arch") or stored.get("arch") or "vit_small"
    patch_size = patch_size or layout.get("patch_size") or stored.get("patch_size") or 16
    source = f"checkpoint {pretrained_weights}"
    if arch.startswith("timm/"):
        model = build_vit(arch, patch_size, img_size=stored.get("global_crops_size", img_size))
        if not any(k.startswith("model.") for k in state_dict):  # timm's own file: our wrapper holds it as .model
            state_dict = {f"model.{k}": v for k, v in state_dict.items() if not k.startswith("head.")}
        load_backbone_state(model, state_dict, source)
    else:
        options = {k: layout[k] for k in LAYOUT_OPTIONS} if layout else {"img_size": img_size}
        if layout and layout["arch"] is None and arch in ARCHS:  # a resized arch (MAE's --embed_dim, --depth)
            options.update(zip(("embed_dim", "depth", "num_heads"),
                               arch_sizes(arch, layout["embed_dim"], layout["depth"], stored.get("num_heads"))))
        with torch.device("meta"):  # every tensor comes from the file: skip the random initialisation
            if "depth" in options:
                model = VisionTransformer(patch_size=patch_size, **options)
            else:
                model = build_vit(arch, patch_size, **options)
        load_backbone_state(model, state_dict, source, assign=True)
        use_source_norm_eps(model, stored)
    return frozen(model), f"{arch}/{patch_size} from {pretrained_weights} ({checkpoint_key})"


def block_features(model, images, n_last_blocks=1, avgpool=False):
    """DINO's linear-evaluation input: the [CLS] tokens of the last n blocks, concatenated; with avgpool (the ViT-B
    recipe, n=1) the mean patch token interleaved with [CLS] as in the official code, so official heads apply."""
    if n_last_blocks == 1 and not avgpool:
        return model(images)
    if not hasattr(model, "get_intermediate_layers"):
        raise UserError("--n_last_blocks above 1 and --avgpool_patchtokens need one of our ViTs (a timm backbone "
                        "gives only its pooled output): use --n_last_blocks 1 --avgpool_patchtokens false")
    outputs = model.get_intermediate_layers(images, n_last_blocks)
    cls = torch.cat([x[:, 0] for x in outputs], dim=-1)
    if not avgpool:
        return cls
    patches = outputs[-1][:, 1 + model.num_register_tokens:].mean(dim=1)
    if n_last_blocks == 1:
        return torch.stack((cls, patches), dim=-1).flatten(1)
    return torch.cat((cls, patches), dim=-1)


def data_splits(data_path):
    """train/ and val/ under --data_path, as DINO's evaluations expect, or those of the embedded default data."""
    root = Path(data_path) if data_path else ensure_default_data()
    splits = root / "train", root / "val"
    for split in splits:
        if not split.is_dir():
            raise UserError(f"{split} is not a folder: --data_path must hold train/ and val/ folders with one "
                            f"subfolder per class")
    return splits


def labelled_datasets(data_path, train_transform, val_transform):
    """Train and val ImageFolders with val labels numbered as in train (a val split may lack some classes)."""
    train_dir, val_dir = data_splits(data_path)
    train, val = ImageDataset(train_dir, train_transform), ImageDataset(val_dir, val_transform)
    for ds in (train, val):
        if not ds.classes:
            raise UserError(f"{ds.root} has no class subfolders: evaluation needs labels, one subfolder per class")
    extra = sorted(set(val.classes) - set(train.classes))
    if extra:
        raise UserError(f"{val_dir} has class(es) missing from {train_dir}: {', '.join(extra[:5])}; every val "
                        f"class needs training images")
    val.samples = [(path, train.class_to_idx[val.classes[t]]) for path, t in val.samples]
    val.targets = [t for _, t in val.samples]
    val.classes, val.class_to_idx = train.classes, train.class_to_idx
    return train, val


class Indexed(torch.utils.data.Dataset):
    """Each sample carries its dataset index next to its label, so gathered features land at their position."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        item = self.dataset[index]
        return None if item is None else (item[0], torch.tensor([item[1], index]))


def gather_rows(rows, device):
    """Every process's rows (their number may differ) concatenated in rank order; one process: unchanged."""
    if not dist.is_dist():
        return rows
    comm = device if tdist.get_backend() == "nccl" else torch.device("cpu")
    sizes = dist.all_gather_tensors(torch.tensor([[len(rows), rows[0].numel() if len(rows) else 0]], device=comm))
    n, width = sizes.max(dim=0).values.tolist()
    padded = torch.zeros(n, width, dtype=rows.dtype, device=comm)
    if len(rows):  # a process may have no rows (more processes than batches)
        padded[:len(rows)] = rows.reshape(len(rows), -1).to(comm)
    parts = dist.all_gather_tensors(padded).cpu().split(n)
    return torch.cat([part[:count] for part, (count, _) in zip(parts, sizes.tolist())])


@torch.no_grad()
def extract_features(embed, dataset, device, precision, batch_size=128, num_workers=10):
    """(features float32, labels) of every readable image, in dataset order, on every process (CPU tensors).

    Each process runs its shard of an unshuffled, padded DistributedSampler; (index, feature) pairs are gathered
    and written by index, so padding duplicates collapse and unreadable images drop out (counted in a warning).
    """
    loader = build_loader(Indexed(dataset), batch_size, num_workers, shuffle=False, drop_last=False)
    features, meta = [], []
    name = getattr(dataset, "root", "data")
    for images, info, _ in tqdm(loader, desc=f"features {name}", disable=not dist.is_main_process(), leave=False,
                                file=sys.stdout, dynamic_ncols=True):
        if images is None:
            continue
        with autocast(device, precision):
            features.append(embed(images.to(device, non_blocking=True)).float().cpu())
        meta.append(info)
    local = torch.cat(features) if features else torch.zeros(0, 0)
    local_meta = torch.cat(meta) if meta else torch.zeros(0, 2, dtype=torch.long)
    all_features, all_meta = gather_rows(local, device), gather_rows(local_meta, device)
    out = torch.zeros(len(dataset), all_features.shape[1])
    labels = torch.zeros(len(dataset), dtype=torch.long)
    seen = torch.zeros(len(dataset), dtype=torch.bool)
    out[all_meta[:, 1]] = all_features
    labels[all_meta[:, 1]] = all_meta[:, 0]
    seen[all_meta[:, 1]] = True
    if not seen.any():
        raise UserError(f"no readable image in {name}: check the files")
    if not seen.all():
        setup_logger().warning(f"{name}: skipped {int((~seen).sum())} image(s) that could not be decoded")
    return out[seen], labels[seen]


class ImageList(torch.utils.data.Dataset):
    """Images given as a list of paths, each optionally cropped to a (left, top, right, bottom) box first, for the
    evaluations whose ground truth names its images (retrieval, copy detection). Items are (image, index); an image
    that cannot be decoded comes back as (None, index) so the caller can name it."""

    def __init__(self, paths, transform, boxes=None):
        self.paths, self.transform, self.boxes = [str(p) for p in paths], transform, boxes

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            with open(self.paths[index], "rb") as f:
                image = Image.open(f).convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None, index
        if self.boxes is not None and self.boxes[index] is not None:
            image = image.crop(self.boxes[index])
        return self.transform(image), index


def size_batches(keys, batch_size, rank=0, world_size=1):
    """Batches of indices whose images share a size key, so that they stack as they are (no padding, no resizing),
    dealt round-robin to the processes. batch_size 1 is the original's one image at a time."""
    groups = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    batches = [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    return batches[rank::world_size]


@torch.no_grad()
def extract_list_features(embed, dataset, size_keys, device, precision, batch_size=16, num_workers=10):
    """Features (float32, CPU, in dataset order, on every process) of an ImageList whose images differ in size.

    Images are batched by size key; the key only groups (a wrong one costs speed, not correctness), since each batch
    is split again by the actual tensor shapes. Every image is needed (rankings index them), so one that cannot be
    decoded stops the run, named, on every process alike.
    """
    batches = size_batches(size_keys, batch_size, dist.get_rank(), dist.get_world_size())
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=list,
                                         pin_memory=device.type == "cuda")
    features, indices, bad = [], [], []
    for items in tqdm(loader, desc="features", disable=not dist.is_main_process(), leave=False, file=sys.stdout,
                      dynamic_ncols=True):
        bad += [index for image, index in items if image is None]
        shapes = {}
        for image, index in items:
            if image is not None:
                shapes.setdefault(tuple(image.shape), []).append((image, index))
        for group in shapes.values():
            images = torch.stack([image for image, _ in group]).to(device, non_blocking=True)
            with autocast(device, precision):
                features.append(embed(images).float().cpu())
            indices.append(torch.tensor([[index] for _, index in group]))
    all_bad = sorted(index for part in dist.all_gather_objects(bad) for index in part)
    if all_bad:
        raise UserError(f"cannot decode image {dataset.paths[all_bad[0]]} ({len(all_bad)} unreadable in all): "
                        f"replace the file(s)")
    local = torch.cat(features) if features else torch.zeros(0, 0)
    local_indices = torch.cat(indices) if indices else torch.zeros(0, 1, dtype=torch.long)
    all_features, all_indices = gather_rows(local, device), gather_rows(local_indices, device)
    out = torch.zeros(len(dataset), all_features.shape[1])
    out[all_indices[:, 0]] = all_features.reshape(len(all_indices), -1)
    return out


def save_features(folder, train_features, test_features, train_labels, test_labels):
    folder = Path(folder)
    for name, tensor in zip(FEATURE_FILES, (train_features, test_features, train_labels, test_labels)):
        save_checkpoint(tensor.contiguous(), folder / name)


def load_features(folder):
    """(train_features, test_features, train_labels, test_labels) saved by save_features or DINO's eval_knn."""
    folder = Path(folder)
    missing = [name for name in FEATURE_FILES if not (folder / name).is_file()]
    if missing:
        raise UserError(f"--load_features {folder} lacks {', '.join(missing)}: give a folder written by "
                        f"--dump_features")
    tensors = [load_file(folder / name) for name in FEATURE_FILES]
    if any(not torch.is_tensor(t) for t in tensors) or len(tensors[0]) != len(tensors[2]) \
            or len(tensors[1]) != len(tensors[3]) or tensors[0].shape[1:] != tensors[1].shape[1:]:
        raise UserError(f"--load_features {folder} holds inconsistent tensors: dump the features again")
    return tuple(t.float() if t.is_floating_point() else t.long() for t in tensors)
