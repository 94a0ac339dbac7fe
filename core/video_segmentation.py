"""Video segmentation by label propagation on frozen ViT patch features (DINO's DAVIS protocol), and its scores.

Propagation: each target patch takes the labels of its `topk` most similar patches, by exp(cos / 0.1), among the
first frame and the last `n_last_frames` frames, restricted to a square window around its own position. Only the
context features are held, never the video's frames.

Scores: region similarity J and boundary F-measure with the mean / recall / decay statistics of davis2017-evaluation
(same numbers on the same masks, reimplemented in numpy and torch without OpenCV or scikit-image), and the semantic
confusion matrix, per-class IoU, mean IoU and pixel accuracy.
"""
import functools
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from core.errors import UserError

# The original's normalisation: note 0.228, not ImageNet's 0.229.
MEAN = (0.485, 0.456, 0.406)
STD = (0.228, 0.224, 0.225)
TEMPERATURE = 0.1
BOUND_TH = 0.008  # boundary tolerance of the F-measure, a fraction of the image diagonal
RECALL_THRESHOLD = 0.5
DECAY_BINS = 4
BAND_LINES = 4  # target lines compared at once with the lines their windows reach (fastest on CPU at 480p)


def davis_palette():
    """The 256 DAVIS (PASCAL VOC) colours: the bits of each index spread over the high bits of R, G and B."""
    index = np.arange(256)
    palette = np.zeros((256, 3), dtype=np.uint8)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= (((index >> (3 * bit + channel)) & 1) << (7 - bit)).astype(np.uint8)
    return palette


def frame_size(height, width, short_side=480):
    """(height, width) the original feeds to the network: short side `short_side`, the long side scaled alike and
    floored to a multiple of 64."""
    if height > width:
        return int(short_side * height / width // 64 * 64), short_side
    return short_side, int(short_side * width / height // 64 * 64)


def image_size(path):
    """(height, width) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except OSError as e:
        raise UserError(f"cannot read image {path} ({type(e).__name__}): replace or remove the file") from e


def read_rgb(path):
    """uint8 (3, H, W) tensor."""
    try:
        with Image.open(path) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    except OSError as e:
        raise UserError(f"cannot decode frame {path} ({type(e).__name__}): replace or remove the file") from e


def prepare_frame(rgb, short_side=480):
    """The network input of the original: bilinear resize of the 8-bit frame (OpenCV's half-pixel mapping, no
    anti-aliasing, rounded back to 8 bits), scaled to [0, 1] and normalised."""
    size = frame_size(rgb.shape[1], rgb.shape[2], short_side)
    x = rgb[None].float()
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).round().clamp(0, 255)
    x = x[0] / 255.0
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def read_label_png(path):
    try:
        with Image.open(path) as im:
            return np.array(im if im.mode in ("P", "L") else im.convert("L"))
    except OSError as e:
        raise UserError(f"cannot read mask {path} ({type(e).__name__}): replace or remove the file") from e


def read_object_mask(path):
    """Object ids 0..K of a DAVIS mask: a DAVIS-2017 palette mask as is (255, void, read as background as
    davis2017-evaluation does), a DAVIS-2016 binary 0/255 mask as object 1."""
    mask = read_label_png(path)
    if mask.ndim != 2:
        raise UserError(f"mask {path} is not a single-channel image: save it as a palette or greyscale PNG")
    values = np.unique(mask)
    if values[-1] == 255 and set(values.tolist()) <= {0, 255}:
        return (mask == 255).astype(np.uint8)
    mask = mask.copy()
    mask[mask == 255] = 0
    return mask


def check_size(mask_path, mask_hw, frame_path, frame_hw):
    if tuple(mask_hw) != tuple(frame_hw):
        raise UserError(f"mask {mask_path} is {mask_hw[1]}x{mask_hw[0]} but its frame {frame_path} is "
                        f"{frame_hw[1]}x{frame_hw[0]}: give masks at the frames' resolution")


def one_hot_grid(channels, grid, num_channels):
    """(gh*gw, C) one-hot float labels on the patch grid: the label map shrunk by nearest neighbour as the original
    does (PIL); channel indices outside 0..C-1 (ignored pixels) give all-zero rows."""
    small = np.array(Image.fromarray(channels.astype(np.uint8)).resize((grid[1], grid[0]), Image.NEAREST))
    small = torch.from_numpy(small.astype(np.int64)).flatten()
    out = torch.zeros(small.numel(), num_channels)
    valid = small < num_channels
    out[valid.nonzero()[:, 0], small[valid]] = 1.0
    return out


@functools.lru_cache(maxsize=8)
def neighbourhood_mask(height, width, radius, device="cpu"):
    """(h*w, h*w) bool: True where the source patch lies within `radius` patches of the target in both directions.
    Built from two 1-D band matrices, once per grid size."""
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    near_rows = (rows[:, None] - rows[None, :]).abs() <= radius
    near_cols = (cols[:, None] - cols[None, :]).abs() <= radius
    return (near_rows[:, None, :, None] & near_cols[None, :, None, :]).reshape(height * width, height * width)


class LabelPropagation:
    """Streaming propagation through one video: the first frame's features and labels plus a ring of the last
    `n_last_frames` frames' features and propagated labels; nothing else is kept.

    Softmax over the top-k cosines / 0.1 equals the original's exp(cos / 0.1) normalised to sum 1 over the top k.
    Taking the top k of the cosines (-inf outside the window) before any exponential gives the same neighbours as
    the original's top k of the masked affinities, since exp is increasing and every window holds at least k
    patches. Targets go in bands of BAND_LINES lines across the grid's longer side, each compared only with the
    lines its windows reach: about half the products of the full affinity at DAVIS resolution."""

    def __init__(self, features, labels, grid, n_last_frames=7, topk=5, radius=12):
        n, dim = features.shape
        self.transposed = grid[1] > grid[0]  # patches are kept column by column when the grid is wider than tall
        self.grid, self.topk = (grid[1], grid[0]) if self.transposed else tuple(grid), topk
        smallest_window = min(grid[0], radius + 1) * min(grid[1], radius + 1) if radius > 0 else n
        if topk > smallest_window:
            raise UserError(f"--topk {topk} exceeds the {smallest_window} patches of the smallest neighbourhood "
                            f"window on a {grid[0]}x{grid[1]} patch grid: lower --topk or raise "
                            f"--size_mask_neighborhood")
        self.keys = features.new_empty(1 + n_last_frames, n, dim)
        self.values = labels.new_empty(1 + n_last_frames, n, labels.shape[1])
        self.keys[0], self.values[0] = self.to_bands(features), self.to_bands(labels)
        self.filled, self.next_slot = 1, 1
        self.bias = None  # 0 inside the window, -inf outside: added to the cosines
        if radius > 0:
            inside = neighbourhood_mask(*self.grid, radius, str(features.device))
            self.bias = torch.zeros(inside.shape, device=features.device).masked_fill_(~inside, -math.inf)
        lines, line = self.grid
        reach = radius if radius > 0 else lines
        self.bands = [(slice(start * line, min(start + BAND_LINES, lines) * line),
                       slice(max(0, start - reach) * line, min(lines, start + BAND_LINES + reach) * line))
                      for start in range(0, lines, BAND_LINES)]

    def to_bands(self, x):
        """Row-major patches to the internal order (column-major when transposed)."""
        return x.reshape(self.grid[1], self.grid[0], -1).transpose(0, 1).reshape(x.shape) if self.transposed else x

    def from_bands(self, x):
        return x.reshape(self.grid[0], self.grid[1], -1).transpose(0, 1).reshape(x.shape) if self.transposed else x

    @torch.no_grad()
    def __call__(self, features):
        """(gh*gw, C) soft labels of the target frame, whose (gh*gw, d) L2-normalised features join the context."""
        features, m = self.to_bands(features), self.filled
        keys, values = self.keys[:m], self.values[:m]
        labels = values.new_empty(values.shape[1:])
        for targets, sources in self.bands:
            sim = torch.matmul(features[targets], keys[:, sources].transpose(1, 2)).permute(1, 0, 2)
            if self.bias is not None:
                sim = sim + self.bias[targets, None, sources]
            cos, index = sim.reshape(sim.shape[0], -1).topk(self.topk, dim=1)
            width = sources.stop - sources.start
            neighbours = values[index // width, index % width + sources.start]
            labels[targets] = torch.einsum("tk,tkc->tc", torch.softmax(cos / TEMPERATURE, dim=1), neighbours)
        if self.keys.shape[0] > 1:
            self.keys[self.next_slot], self.values[self.next_slot] = features, labels
            self.filled = min(self.filled + 1, self.keys.shape[0])
            self.next_slot = self.next_slot % (self.keys.shape[0] - 1) + 1
        return self.from_bands(labels)


def patch_features(model, images):
    """(B, gh*gw, d) L2-normalised last-layer patch tokens (after the final norm), float32."""
    if hasattr(model, "get_intermediate_layers"):
        tokens = model.get_intermediate_layers(images, 1)[0][:, 1 + model.num_register_tokens:]
    else:
        inner = model.model
        if getattr(inner, "num_prefix_tokens", None) is None:
            raise UserError(f"{type(inner).__name__} gives no patch tokens: video segmentation needs a ViT backbone")
        tokens = inner.forward_features(images)[:, inner.num_prefix_tokens:]
    return F.normalize(tokens.float(), dim=-1)


def labels_to_mask(labels, grid, patch_size, out_hw):
    """uint8 (H, W) channel index per pixel: soft labels upsampled by the patch size (bilinear), each channel with
    a positive maximum min-max normalised, arg-maxed, then resized to the frame by nearest neighbour."""
    maps = labels.T.reshape(1, -1, *grid)
    maps = F.interpolate(maps, scale_factor=patch_size, mode="bilinear", align_corners=False,
                         recompute_scale_factor=False)[0]
    low, high = maps.amin(dim=(1, 2)), maps.amax(dim=(1, 2))
    positive = high > 0
    low, span = torch.where(positive, low, 0.0), torch.where(positive, high - low, 1.0)
    maps = (maps - low[:, None, None]) / span[:, None, None]
    index = maps.argmax(dim=0).to(torch.uint8).cpu().numpy()
    return np.array(Image.fromarray(index).resize((out_hw[1], out_hw[0]), Image.NEAREST))


def save_indexed_png(path, array, palette):
    im = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), mode="P")
    im.putpalette(palette.ravel().tolist())
    im.save(path, format="PNG")


# ----------------------------------------------------------------------------------------------------------------
# DAVIS scores


def region_similarity(gt, pred):
    """J: intersection over union of two boolean masks; 1 when both are empty."""
    union = np.logical_or(gt, pred).sum()
    return 1.0 if union == 0 else np.logical_and(gt, pred).sum() / union


def boundary_map(mask):
    """One-pixel boundary of a boolean mask as davis2017-evaluation draws it: a pixel differing from its right,
    lower or lower-right neighbour (outside the image reads as background); on the last row only the right
    neighbour counts, on the last column only the lower one, and the bottom-right pixel never."""
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros_like(mask)
    out[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    out[:-1, :] |= mask[:-1, :] != mask[1:, :]
    out[:-1, :-1] |= mask[:-1, :-1] != mask[1:, 1:]
    return out


def disk(radius):
    offsets = np.arange(-radius, radius + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius ** 2


def dilate(mask, radius):
    """Binary dilation by a disk of the given radius (pixels beyond the border add nothing)."""
    kernel = torch.from_numpy(disk(radius).astype(np.float32))[None, None]
    x = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    return (F.conv2d(x, kernel, padding=radius)[0, 0] > 0.5).numpy()


def boundary_tolerance(shape, bound_th=BOUND_TH):
    """Matching distance in pixels: bound_th of the image diagonal, rounded up (or bound_th itself when >= 1)."""
    return int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*shape)))


def boundary_f_measure(gt, pred, bound_th=BOUND_TH):
    """F: harmonic mean of boundary precision and recall, a boundary pixel counting as matched when the other
    mask's boundary passes within the tolerance (the dilation form of the bipartite matching)."""
    radius = boundary_tolerance(np.shape(gt), bound_th)
    pred_b, gt_b = boundary_map(pred), boundary_map(gt)
    n_pred, n_gt = pred_b.sum(), gt_b.sum()
    if n_pred == 0 or n_gt == 0:
        precision, recall = (1.0 if n_pred == 0 else 0.0), (1.0 if n_gt == 0 else 0.0)
    else:
        precision = np.logical_and(pred_b, dilate(gt_b, radius)).sum() / n_pred
        recall = np.logical_and(gt_b, dilate(pred_b, radius)).sum() / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def davis_statistics(values):
    """(mean, recall, decay) of one object's per-frame J or F: recall is the fraction above 0.5; decay the mean of
    the first quarter minus that of the last, with davis2017-evaluation's quarter bounds (which share their end
    frames). NaN for an empty list."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return math.nan, math.nan, math.nan
    bounds = np.round(np.linspace(1, len(values), DECAY_BINS + 1) + 1e-10).astype(int) - 1
    first, last = values[bounds[0]:bounds[1] + 1], values[bounds[-2]:bounds[-1] + 1]
    return (float(np.nanmean(values)), float(np.nanmean(values > RECALL_THRESHOLD)),
            float(np.nanmean(first) - np.nanmean(last)))


def object_scores(gt, pred, num_objects):
    """([J], [F]) of objects 1..num_objects for one frame (id arrays of equal shape)."""
    js, fs = [], []
    for obj in range(1, num_objects + 1):
        g, p = gt == obj, pred == obj
        js.append(region_similarity(g, p))
        fs.append(boundary_f_measure(g, p))
    return js, fs


# ----------------------------------------------------------------------------------------------------------------
# Semantic scores and pictures


def confusion_matrix(gt, pred, num_classes):
    """(C, C) int64 counts, rows ground truth, columns prediction; gt entries outside 0..C-1 are ignored."""
    gt, pred = np.asarray(gt, dtype=np.int64).ravel(), np.asarray(pred, dtype=np.int64).ravel()
    keep = (gt >= 0) & (gt < num_classes)
    return np.bincount(gt[keep] * num_classes + pred[keep], minlength=num_classes ** 2).reshape(num_classes,
                                                                                                num_classes)


def semantic_scores(confusion):
    """(per-class IoU with NaN for classes neither present nor predicted, mean IoU over the others, pixel accuracy)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, math.nan)
    total = confusion.sum()
    return iou, float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan, \
        float(tp.sum() / total) if total else math.nan


def colour_overlay(rgb, class_map, palette, alpha=0.5):
    """uint8 (H, W, 3): the frame blended with the palette colour of each pixel's class."""
    rgb = np.asarray(rgb, dtype=np.float32)
    return (rgb * (1 - alpha) + palette[class_map].astype(np.float32) * alpha).round().astype(np.uint8)


def error_overlay(rgb, gt, pred, ignore_index):
    """uint8 (H, W, 3): the frame in grey, correct pixels tinted green, wrong ones red, ignored ones left grey."""
    grey = np.asarray(rgb, dtype=np.float32).mean(axis=2, keepdims=True).repeat(3, axis=2)
    out = grey * 0.6
    scored = gt != ignore_index
    right, wrong = scored & (gt == pred), scored & (gt != pred)
    out[right] = grey[right] * 0.5 + np.array([0, 160, 0], np.float32)
    out[wrong] = grey[wrong] * 0.3 + np.array([220, 0, 0], np.float32)
    return out.clip(0, 255).round().astype(np.uint8)


def read_classes(path):
    """[(id, name)] from `id name` lines; blank lines and lines starting with # are skipped."""
    classes = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head, _, name = line.partition(" ")
        if not head.isdigit() or int(head) > 255:
            raise UserError(f"{path} line {number} is not `id name` with an id in 0..255: fix the file")
        classes.append((int(head), name.strip() or head))
    if len({c for c, _ in classes}) != len(classes):
        raise UserError(f"{path} lists a class id twice: give each id once")
    return classes
