"""DINO multi-crop augmentation, MAE pretraining and fine-tuning views (the latter by timm, as the original) and the
evaluation transform.

DINO's views are built as the original builds them, with PIL (bicubic crops, ImageEnhance colour jitter, PIL's
Gaussian blur), whose C operations beat tensor ones on a CPU (a 224 px blur: 1.7 ms against 13.5 ms), but by direct
calls: the transform objects' per-call overhead is a large share of the original chain's time at these sizes. The
random parameters come from Python's `random`, with torchvision's distributions. With photometric=False the
workers stop after the crop and flip, and core.gpu_augment does the rest batched on the training device
(--gpu_augment).
"""
import math
import random

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import v2

from core.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BICUBIC = v2.InterpolationMode.BICUBIC
BLUR_SIGMA = (0.1, 2.0)
# ColorJitter(0.4, 0.4, 0.2, 0.1) of the recipe as factor ranges; applied with p=0.8, in a random order per view.
JITTER = {"brightness": (0.6, 1.4), "contrast": (0.6, 1.4), "saturation": (0.8, 1.2), "hue": (-0.1, 0.1)}
JITTER_P, GRAYSCALE_P, FLIP_P = 0.8, 0.2, 0.5
SOLARIZE_THRESHOLD = 128
RATIO = (3 / 4, 4 / 3)
SOLARIZE_LUT = [i if i < SOLARIZE_THRESHOLD else 255 - i for i in range(256)]


def to_normalized():
    """The shared tail: uint8 -> float in [0, 1] -> ImageNet normalisation -> a plain tensor for default_collate."""
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD), v2.ToPureTensor()]


def view_settings(global_size, local_size, local_crops_number, global_crops_scale, local_crops_scale):
    """(size, scale range, blur probability, solarize probability) of each view, in the recipe's order: global view 1
    always blurred, global view 2 rarely blurred and sometimes solarised, local views blurred half the time."""
    return ([(global_size, tuple(global_crops_scale), 1.0, 0.0), (global_size, tuple(global_crops_scale), 0.1, 0.2)]
            + [(local_size, tuple(local_crops_scale), 0.5, 0.0)] * local_crops_number)


def blur_scale(global_size):
    """DINO's blur sigmas are pixels of a 224 px crop: scaling them by global crop side / 224 keeps the same relative
    blur on smaller crops, so 64 px images are not blurred beyond recognition; at the recipe's sizes it is 1."""
    return global_size / 224


def random_resized_crop_box(width, height, scale, ratio=RATIO):
    """(left, top, width, height) with torchvision's RandomResizedCrop.get_params distribution: area fraction
    uniform in `scale`, log aspect ratio uniform, ten tries, then the largest centred crop within `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return random.randint(0, width - w), random.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def crop_and_flip(image, size, scale):
    """RandomResizedCrop (bicubic) to size x size, then a horizontal flip with p=0.5."""
    left, top, w, h = random_resized_crop_box(*image.size, scale)
    image = image.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
    return image.transpose(Image.FLIP_LEFT_RIGHT) if random.random() < FLIP_P else image


def adjust_brightness(image, factor):
    """torchvision's adjust_brightness on PIL images (ImageEnhance.Brightness: a blend with black), called
    directly."""
    return Image.blend(Image.new(image.mode, image.size, 0), image, factor)


def adjust_contrast(image, factor):
    """torchvision's adjust_contrast on PIL images (ImageEnhance.Contrast: a blend with the mean grey level,
    rounded), called directly; the mean comes from the grey histogram as ImageStat computes it."""
    histogram = np.array(image.convert("L").histogram())
    mean = int(histogram @ np.arange(256) / histogram.sum() + 0.5)
    return Image.blend(Image.new(image.mode, image.size, (mean,) * len(image.getbands())), image, factor)


def adjust_saturation(image, factor):
    """torchvision's adjust_saturation on PIL images (ImageEnhance.Color: a blend with the grey image)."""
    return Image.blend(image.convert("L").convert(image.mode), image, factor)


def adjust_hue(image, factor):
    """torchvision's adjust_hue on PIL images: the 8-bit hue channel of PIL's HSV shifted by int(factor * 255)
    with wrap-around; the shift is a table instead of a round trip through numpy."""
    shift = int(factor * 255)
    h, s, v = image.convert("HSV").split()
    h = h.point([(i + shift) % 256 for i in range(256)])
    return Image.merge("HSV", (h, s, v)).convert(image.mode)


COLOR_OPS = {"brightness": adjust_brightness, "contrast": adjust_contrast, "saturation": adjust_saturation,
             "hue": adjust_hue}


def color_jitter(image):
    """ColorJitter(0.4, 0.4, 0.2, 0.1) as torchvision draws it: four factors, applied in a random order."""
    factors = {name: random.uniform(*JITTER[name]) for name in JITTER}
    order = random.sample(list(JITTER), len(JITTER))
    for name in order:
        image = COLOR_OPS[name](image, factors[name])
    return image


def photometric(image, blur_p, solarize_p, sigma_scale):
    """The recipe's colour jitter (p=0.8), grayscale (p=0.2), PIL Gaussian blur with radius ~ U(0.1, 2.0) and
    solarisation at 128, on a PIL crop. A grey crop stays one band; the tensor conversion repeats it."""
    if random.random() < JITTER_P:
        image = color_jitter(image)
    if random.random() < GRAYSCALE_P:
        image = image.convert("L")
    if blur_p >= 1.0 or random.random() <= blur_p:
        sigma = random.uniform(*BLUR_SIGMA) * sigma_scale
        image = image.filter(ImageFilter.GaussianBlur(radius=sigma))
    if solarize_p and random.random() < solarize_p:
        image = image.point(SOLARIZE_LUT * len(image.getbands()))
    return image


NORM_SCALE = 1 / (255 * torch.tensor(IMAGENET_STD).view(3, 1, 1))
NORM_SHIFT = -torch.tensor(IMAGENET_MEAN).view(3, 1, 1) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def normalized_tensor(image):
    """An RGB or grey PIL image to a normalised float (3, H, W) tensor in one pass (grey repeated over RGB)."""
    pixels = torch.from_numpy(np.array(image))
    pixels = pixels.permute(2, 0, 1) if pixels.ndim == 3 else pixels.unsqueeze(0)
    out = torch.empty(3, *pixels.shape[1:])
    return torch.addcmul(NORM_SHIFT, pixels, NORM_SCALE, out=out)


def uint8_tensor(image):
    """A PIL RGB crop as a (H, W, 3) uint8 tensor: stacking these is a plain copy, the device permutes."""
    return torch.from_numpy(np.array(image))


class DataAugmentationDINO:
    """Two global views and N local views of one image, with DINO's asymmetric blur/solarisation between globals.

    photometric=False returns the crops (flipped, uint8, (H, W, 3)) for core.gpu_augment to finish on the device.
    """

    def __init__(self, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4), local_crops_number=8,
                 global_size=224, local_size=96, photometric=True):
        self.views = view_settings(global_size, local_size, local_crops_number, global_crops_scale,
                                   local_crops_scale)
        self.local_crops_number = local_crops_number
        self.sigma_scale = blur_scale(global_size)
        self.photometric = photometric

    def __call__(self, image):
        crops = []
        for size, scale, blur_p, solarize_p in self.views:
            crop = crop_and_flip(image, size, scale)
            if self.photometric:
                crops.append(normalized_tensor(photometric(crop, blur_p, solarize_p, self.sigma_scale)))
            else:
                crops.append(uint8_tensor(crop))
        return crops


def eval_transform(resize=256, crop=224):
    """Short side to `resize` (bicubic) then a centre crop, as in DINO's k-NN and linear evaluation."""
    return v2.Compose([v2.ToImage(), v2.Resize(resize, interpolation=BICUBIC, antialias=True), v2.CenterCrop(crop)]
                      + to_normalized())


def linear_train_transform(crop=224):
    """DINO's linear-evaluation training view: RandomResizedCrop (torchvision's default bilinear, as the original)
    and a horizontal flip."""
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(crop, antialias=True), v2.RandomHorizontalFlip()]
                      + to_normalized())


def mae_pretrain_transform(input_size=224):
    """MAE pretraining view: RandomResizedCrop (scale 0.2-1, bicubic) and a horizontal flip, nothing else."""
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=BICUBIC,
                                                          antialias=True), v2.RandomHorizontalFlip()]
                      + to_normalized())


def posterize(img, bits_to_keep, **_):
    """timm's posterize, also at 0 bits (RandAugment's top magnitude): recent Pillow (13 here) refuses them, the
    older Pillow the recipe ran with returned a black image."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def finetune_transform(input_size=224, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel",
                       re_count=1, color_jitter=None):
    """MAE fine-tuning view, built by timm as the original: RandomResizedCrop, flip, RandAugment, random erasing.
    auto_augment "none" (or empty) turns RandAugment off."""
    from timm.data import create_transform
    from timm.data.auto_augment import RandAugment

    if auto_augment in ("", "none"):
        auto_augment = None
    try:
        transform = create_transform(input_size, is_training=True, color_jitter=color_jitter,
                                     auto_augment=auto_augment, interpolation="bicubic", re_prob=re_prob,
                                     re_mode=re_mode, re_count=re_count, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    except AssertionError as e:
        raise UserError(f"--aa {auto_augment}: {e}; use a timm policy such as rand-m9-mstd0.5-inc1, or none") from e
    for t in transform.transforms:
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = posterize
    return transform


def eval_resize(input_size=224):
    """MAE's evaluation resize before the centre crop: crop ratio 224/256 up to 224 px, the crop itself above."""
    return int(input_size / (224 / 256)) if input_size <= 224 else input_size
