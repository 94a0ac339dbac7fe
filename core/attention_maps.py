"""[CLS] self-attention of a ViT's last block, per head, as DINO's visualize_attention.py and video_generation.py show
it, for images of any size and aspect: an image is cropped to the patch grid, never resized to a square. Masks keep
the smallest set of patches that holds a given fraction of a head's attention mass, as DINO's do."""
import colorsys
import io

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from core.augment import IMAGENET_MEAN, IMAGENET_STD
from core.checkpoint import save_checkpoint
from core.device import autocast
from core.errors import UserError
from core.features import build_backbone
from core.log import setup_logger
from core.vision_transformer import ARCHS


def add_attention_model_args(p):
    """The model flags of DINO's visualize_attention.py and video_generation.py, with their defaults."""
    p.add_argument("--arch", default=None, choices=ARCHS,
                   help="ViT size; default: the checkpoint's, else vit_small (the original's default).")
    p.add_argument("--patch_size", default=None, type=int,
                   help="Patch size; default: the checkpoint's, else 8 (the original's default).")
    p.add_argument("--pretrained_weights", default="", type=str,
                   help="Any checkpoint the evaluations take (ours, official DINO, HF folder, Google .npz...). "
                        "Empty: random weights (nothing is downloaded), said in the log.")
    p.add_argument("--checkpoint_key", default="teacher", type=str,
                   help='Key to use in the checkpoint (example: "teacher").')


def attention_model(args, device, default_patch_size=8):
    """The frozen ViT of --pretrained_weights (arch and patch size from the weights unless given), or a random one
    of --arch with DINO's default patch size 8, said loudly: its maps show no objects."""
    weights = args.pretrained_weights
    arch = args.arch or (None if weights else "vit_small")
    patch_size = args.patch_size or (None if weights else default_patch_size)
    model, description = build_backbone(weights, args.checkpoint_key, arch, patch_size)
    if not hasattr(model, "get_last_selfattention"):
        raise UserError(f"{description} is a timm backbone, which does not return its attention: use one of our ViTs "
                        f"(--arch vit_tiny/vit_small/vit_base/vit_large)")
    log = setup_logger()
    (log.warning if description.startswith("RANDOM") else log.info)(f"model: {description}")
    return model.to(device)


def fit_in_box(width, height, box_height, box_width):
    """(width, height) scaled, aspect kept, to the largest size inside the box."""
    scale = min(box_height / height, box_width / width)
    return max(1, round(width * scale)), max(1, round(height * scale))


def prepare(rgb, patch_size, size=None):
    """(H x W x 3 uint8 picture, 1 x 3 x H x W normalised model input) of an RGB array resized, aspect kept, to size
    (an int: the short side; (height, width): the largest size inside that box; None: as it is), then cropped at the
    bottom and right to whole patches."""
    image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
    if isinstance(size, (tuple, list)):
        width, height = fit_in_box(image.shape[2], image.shape[1], *size)
        image = TF.resize(image, [height, width], antialias=True)
    elif size is not None:
        image = TF.resize(image, [size], antialias=True)
    h, w = image.shape[1] // patch_size * patch_size, image.shape[2] // patch_size * patch_size
    if not h or not w:
        raise UserError(f"an image of {image.shape[2]}x{image.shape[1]} pixels is smaller than one {patch_size}-pixel "
                        f"patch: use a larger image or --image_size/--resize")
    image = image[:, :h, :w]
    model_input = TF.normalize(image.float().div(255), IMAGENET_MEAN, IMAGENET_STD)[None]
    return image.permute(1, 2, 0).numpy(), model_input


@torch.no_grad()
def cls_attention(model, images, device, precision="fp32"):
    """(heads, grid_h, grid_w) attention of [CLS] to each patch in the last block (register tokens left out), for
    one image; rows of the grid follow the image's height."""
    with autocast(device, precision):
        attn = model.get_last_selfattention(images.to(device))
    grid_h, grid_w = images.shape[-2] // model.patch_size, images.shape[-1] // model.patch_size
    patches = attn[0, :, 0, 1 + model.num_register_tokens:].float().cpu()
    return patches.reshape(-1, grid_h, grid_w)


def threshold_masks(attention, fraction):
    """Per head, the smallest set of patches with the largest attention whose share of the head's patch attention
    mass reaches fraction (DINO: sorted ascending, keep where the normalised cumulative sum exceeds 1 - fraction)."""
    flat = attention.flatten(1)
    values, order = flat.sort(dim=1)
    keep = (values / values.sum(dim=1, keepdim=True)).cumsum(dim=1) > 1 - fraction
    return torch.zeros_like(keep).scatter_(1, order, keep).reshape(attention.shape)


def upsample(maps, patch_size):
    """Each patch's value over its patch_size x patch_size pixels (DINO's nearest interpolation)."""
    return F.interpolate(maps[None].float(), scale_factor=patch_size, mode="nearest")[0]


def colorize(values, cmap="viridis"):
    """H x W x 3 uint8 of a map scaled to its own min and max, as matplotlib's imsave draws it."""
    values = np.asarray(values, dtype=np.float64)
    span = values.max() - values.min()
    scaled = (values - values.min()) / span if span > 0 else np.zeros_like(values)
    return (matplotlib.colormaps[cmap](scaled)[..., :3] * 255).round().astype(np.uint8)


def blend(rgb, overlay, alpha):
    return (rgb.astype(np.float32) * (1 - alpha) + overlay.astype(np.float32) * alpha).round().astype(np.uint8)


def head_colors(n):
    """n bright colours evenly spaced in hue (DINO shuffles them at random; fixed ones keep runs comparable)."""
    return [np.array(colorsys.hsv_to_rgb(i / n, 1.0, 1.0)) * 255 for i in range(n)]


def mask_picture(rgb, mask, color, alpha=0.5):
    """The image tinted in color where the mask is on, with the mask's outline drawn in full color."""
    out = rgb.astype(np.float32)
    out[mask] = out[mask] * (1 - alpha) + color * alpha
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    out[mask & ~inner] = color
    return out.round().astype(np.uint8)


def save_picture(rgb, path, image_format="PNG"):
    """Written whole or not at all (temporary file, then rename)."""
    save_checkpoint(Image.fromarray(rgb), path, write=lambda img, f: img.save(f, format=image_format, quality=95))
    return path


def save_heads_figure(rgb, maps, path):
    """One figure: the image, then each head's attention blended over it."""
    panels = [("image", rgb)] + [(f"head {j}", blend(rgb, colorize(m), 0.6)) for j, m in enumerate(maps)]
    cols = min(len(panels), 4)
    rows = -(-len(panels) // cols)
    height, width = rgb.shape[:2]
    fig = Figure(figsize=(3 * cols, 3 * rows * height / width + 0.3 * rows))  # no pyplot: no GUI, no global state
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, picture) in zip(axes.flat, panels):
        ax.imshow(picture)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    save_checkpoint(buffer.getvalue(), path, write=lambda data, f: f.write(data))
    return path
