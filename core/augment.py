"""DINO multi-crop augmentation, MAE pretraining and fine-tuning views (the latter by timm, as the original) and the
evaluation transform; our own transforms run on uint8 image tensors for speed."""
import math

import torch
from PIL import ImageOps
from torchvision.transforms import v2

from core.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BICUBIC = v2.InterpolationMode.BICUBIC
BLUR_SIGMA = (0.1, 2.0)


def to_normalized():
    """The shared tail: uint8 -> float in [0, 1] -> ImageNet normalisation -> a plain tensor for default_collate."""
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD), v2.ToPureTensor()]


def gaussian_blur(p, scale=1.0):
    """Blur with sigma ~ U(0.1, 2.0) * scale applied with probability p, as in DINO's utils.GaussianBlur.

    DINO's sigmas are pixels of a 224 px crop: `scale` (crop side / 224) keeps the same relative blur on smaller
    crops, so 64 px images are not blurred beyond recognition; at the recipe's sizes scale is 1. PIL's
    GaussianBlur(radius=sigma), which DINO uses, reaches about 3 sigma each side: the kernel covers that (13 taps
    at scale 1), and for smaller sigma the extra taps are ~0.
    """
    kernel = 2 * math.ceil(3 * BLUR_SIGMA[1] * scale) + 1
    blur = v2.GaussianBlur(kernel, sigma=(BLUR_SIGMA[0] * scale, BLUR_SIGMA[1] * scale))
    return blur if p >= 1.0 else v2.RandomApply([blur], p=p)


class DataAugmentationDINO:
    """Two global views and N local views of one image, with DINO's asymmetric blur/solarisation between globals."""

    def __init__(self, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4), local_crops_number=8,
                 global_size=224, local_size=96):
        def flip_and_color_jitter():
            return [
                v2.RandomHorizontalFlip(p=0.5),
                v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
                v2.RandomGrayscale(p=0.2),
            ]

        def crop(size, scale):
            return [v2.ToImage(), v2.RandomResizedCrop(size, scale=scale, interpolation=BICUBIC, antialias=True)]

        self.local_crops_number = local_crops_number
        blur_scale = global_size / 224
        self.global1 = v2.Compose(crop(global_size, global_crops_scale) + flip_and_color_jitter()
                                  + [gaussian_blur(1.0, blur_scale)] + to_normalized())
        self.global2 = v2.Compose(crop(global_size, global_crops_scale) + flip_and_color_jitter()
                                  + [gaussian_blur(0.1, blur_scale), v2.RandomSolarize(threshold=128, p=0.2)]
                                  + to_normalized())
        self.local = v2.Compose(crop(local_size, local_crops_scale) + flip_and_color_jitter()
                                + [gaussian_blur(0.5, blur_scale)] + to_normalized())

    def __call__(self, image):
        crops = [self.global1(image), self.global2(image)]
        crops += [self.local(image) for _ in range(self.local_crops_number)]
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
