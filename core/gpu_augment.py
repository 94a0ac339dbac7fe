"""DINO's photometric augmentation batched on the training device (--gpu_augment): the loader's workers only decode,
crop and flip (core.augment with photometric=False); colour jitter, grayscale, Gaussian blur, solarisation and the
ImageNet normalisation run here on whole batches of uint8 crops.

Every sample draws its own parameters, as the recipe's per-image transforms do: whether jitter applies, the jitter
factors and their order (a random permutation per sample, as torchvision's ColorJitter), grayscale, blur and its
sigma, solarisation. They are drawn on the CPU from a generator seeded by (seed, step, micro-batch) for the global
batch, and each process takes the samples the DistributedSampler gave it, so a resumed run, or one with another
number of processes, sees the same views. Sample selections are index lists known on the host, so nothing here waits
for the device.

The colour operations are torchvision's tensor formulas (tested against torchvision on the same parameters); the
blur is kornia's gaussian_blur2d, a true Gaussian with a per-sample sigma and reflect padding, which equals
torchvision's gaussian_blur on tensors. The CPU pipeline and the original use PIL's GaussianBlur, an extended box
blur approximating the same Gaussian (the kernel covers 3 sigma each side, 13 taps at the recipe's sizes). kornia's
own ColorJitter draws one order per batch and its RandomSolarize a random threshold, so those are ours.
"""
import importlib.util
import itertools
import math

import numpy as np
import torch

from core.augment import (BLUR_SIGMA, GRAYSCALE_P, IMAGENET_MEAN, IMAGENET_STD, JITTER, JITTER_P,
                          SOLARIZE_THRESHOLD)
from core.errors import UserError

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale on tensors


def require_kornia():
    if importlib.util.find_spec("kornia") is None:
        raise UserError("--gpu_augment needs the 'kornia' package, which is not installed: pip install kornia, "
                        "or leave out --gpu_augment to augment on the CPU")


def grayscale(x):
    """(N, 3, H, W) -> (N, 1, H, W) luma with torchvision's weights."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def per_sample(factor):
    return factor.view(-1, 1, 1, 1)


def blend(x, other, factor):
    """torchvision's _blend for float images, factor per sample."""
    f = per_sample(factor)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def adjust_brightness(x, factor):
    return (per_sample(factor) * x).clamp_(0, 1)


def adjust_contrast(x, factor):
    return blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x, factor):
    return blend(x, grayscale(x), factor)


def adjust_hue(x, factor):
    """torchvision's adjust_hue for float images (hue shifted by `factor` turns, per sample), written without
    building the HSV image: value and chroma stay, and each channel is value - chroma * clamp(min(k, 4 - k), 0, 1)
    with k = (hue * 6 + n) mod 6 for n = 5, 3, 1 (the usual HSV -> RGB identity)."""
    r, g, b = x.unbind(1)
    value, _ = x.max(dim=1)
    chroma = value - x.min(dim=1)[0]
    safe = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    hue = torch.where(value == r, (g - b) / safe, torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.remainder(hue / 6 + factor.view(-1, 1, 1), 1.0) * 6
    channels = []
    for n in (5, 3, 1):
        k = torch.remainder(hue + n, 6)
        channels.append(value - chroma * torch.minimum(k, 4 - k).clamp_(0, 1))
    return torch.stack(channels, dim=1)


def solarize(x):
    """Pixels at or above 128 (of 255) inverted, as PIL's ImageOps.solarize and torchvision's solarize."""
    return torch.where(x >= SOLARIZE_THRESHOLD / 255, 1 - x, x)


def blur_kernel_size(max_sigma):
    """Taps covering 3 sigma each side of the largest sigma: 13 at the recipe's sizes."""
    return 2 * math.ceil(3 * max_sigma) + 1


def gaussian_blur(x, sigma, kernel_size):
    """Gaussian blur with one sigma per sample, a CPU tensor, so that kornia checks it without reading the device."""
    from kornia.filters import gaussian_blur2d

    return gaussian_blur2d(x, kernel_size, sigma.view(-1, 1).expand(-1, 2), border_type="reflect")


COLOR_OPS = {"brightness": adjust_brightness, "contrast": adjust_contrast, "saturation": adjust_saturation,
             "hue": adjust_hue}


def draw_view(generator, n, blur_p, solarize_p, sigma_scale):
    """The random parameters of one view for n samples, with the recipe's distributions."""
    def uniform(low, high):
        return low + (high - low) * torch.rand(n, generator=generator)

    return {
        "jitter": torch.rand(n, generator=generator) < JITTER_P,
        "order": torch.rand(n, len(JITTER), generator=generator).argsort(dim=1),
        "factors": {name: uniform(*JITTER[name]) for name in JITTER},
        "gray": torch.rand(n, generator=generator) < GRAYSCALE_P,
        "blur": torch.rand(n, generator=generator) < blur_p,
        "sigma": uniform(*BLUR_SIGMA) * sigma_scale,
        "solarize": torch.rand(n, generator=generator) < solarize_p,
    }


def take(params, rows):
    """The rows of this process's samples from the global batch's parameters."""
    return {k: take(v, rows) if isinstance(v, dict) else v[rows] for k, v in params.items()}


def concat(params):
    """The parameters of several views as those of one batch holding them one after the other."""
    return {k: concat([p[k] for p in params]) if isinstance(params[0][k], dict) else torch.cat([p[k] for p in params])
            for k in params[0]}


class GPUAugmentDINO:
    """Finishes the crops of core.augment.DataAugmentationDINO(photometric=False) on the device they are on.

    views and sigma_scale are that transform's; batch_size is per process, rank and world_size say which samples
    of the global batch this process holds (the DistributedSampler deals them out in turn).
    """

    def __init__(self, views, sigma_scale, seed=0, batch_size=1, rank=0, world_size=1):
        require_kornia()
        self.views = views
        self.sigma_scale = sigma_scale
        self.kernel_size = blur_kernel_size(BLUR_SIGMA[1] * sigma_scale)
        self.seed = seed
        self.global_batch = batch_size * world_size
        self.rows = torch.arange(rank, self.global_batch, world_size)

    def draw(self, global_batch, step, micro=0):
        """Parameters of every view for the whole global batch of (step, micro-batch)."""
        state = np.random.SeedSequence([self.seed, step, micro]).generate_state(2)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        return [draw_view(generator, global_batch, blur_p, solarize_p, self.sigma_scale)
                for _, _, blur_p, solarize_p in self.views]

    @torch.no_grad()
    def __call__(self, crops, step, micro=0):
        """crops: one (N, H, W, 3) uint8 batch per view on the device; returns normalised (N, 3, H, W) floats.
        A batch short of undecodable images takes the first rows."""
        rows = self.rows[:len(crops[0])]
        params = [take(p, rows) for p in self.draw(self.global_batch, step, micro)]
        out = []
        # Views with the same settings (the local ones) go through as one batch: fewer, larger kernels.
        for _, group in itertools.groupby(range(len(crops)), key=lambda v: self.views[v]):
            group = list(group)
            x = self.augment(torch.cat([crops[v] for v in group]), concat([params[v] for v in group]))
            out += x.chunk(len(group))
        return out

    def augment(self, crops, p):
        x = crops.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format).div_(255)
        for position in range(len(JITTER)):
            for op, name in enumerate(JITTER):
                apply_to(x, p["jitter"] & (p["order"][:, position] == op), COLOR_OPS[name], p["factors"][name])
        apply_to(x, p["gray"], lambda v: grayscale(v).expand(-1, 3, -1, -1))
        apply_to(x, p["blur"], lambda v, sigma: gaussian_blur(v, sigma, self.kernel_size), p["sigma"],
                 factor_on_host=True)
        apply_to(x, p["solarize"], solarize)
        for channel, (mean, std) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD)):  # no host tensor to copy over
            x[:, channel].sub_(mean).div_(std)
        return x


def apply_to(x, selected, op, factor=None, factor_on_host=False):
    """x[selected] = op(x[selected], factor[selected]) in place; `selected` is a host mask, so the indices reach the
    device by a copy instead of a nonzero() that would wait for it."""
    index = selected.nonzero().squeeze(1)
    if len(index) == 0:
        return
    device_index = to_device(index, x.device)
    args = () if factor is None else (factor[index] if factor_on_host else to_device(factor[index], x.device),)
    x.index_copy_(0, device_index, op(x.index_select(0, device_index), *args))


def to_device(t, device):
    """A copy to a CUDA device from pinned memory, which the host does not wait for."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)
