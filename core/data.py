"""Image datasets (ImageFolder tree or flat folder) whose unreadable files are skipped and counted, and loaders."""
import itertools
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler, default_collate
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension, make_dataset

from core.errors import UserError


def list_images(folder):
    """Every image below `folder`, sorted, so a flat dataset has the same order on every machine."""
    found = []
    for dirpath, _, filenames in os.walk(folder, followlinks=True):
        found += [os.path.join(dirpath, f) for f in filenames if has_file_allowed_extension(f, IMG_EXTENSIONS)]
    return sorted(found)


def has_class_folders(root):
    """A tree is an ImageFolder when its images all live in subfolders; any image at the top makes it flat."""
    entries = list(os.scandir(root))
    if any(e.is_file() and has_file_allowed_extension(e.name, IMG_EXTENSIONS) for e in entries):
        return False
    return any(e.is_dir() and list_images(e.path) for e in entries)


class ImageDataset(torch.utils.data.Dataset):
    """ImageFolder when `root` has class subfolders, else a flat folder of unlabeled images (target 0).

    An image that cannot be decoded yields None with a warning instead of killing a long run; collate_skip_bad
    drops and counts it. The epoch lives in shared memory, so that persistent loader workers see set_epoch.
    """

    def __init__(self, root, transform=None, seed=None):
        self.root = Path(root)
        self.transform = transform
        self.seed = seed
        self.shared_epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        if not self.root.exists():
            raise UserError(f"data path {self.root} does not exist; give an existing folder of images")
        if not self.root.is_dir():
            raise UserError(f"data path {self.root} is not a folder; give a folder of images "
                            f"(optionally one subfolder per class)")
        if has_class_folders(self.root):
            self.classes, self.class_to_idx = find_classes(self.root)
            self.samples = make_dataset(self.root, self.class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        else:
            self.classes, self.class_to_idx = [], {}
            self.samples = [(path, 0) for path in list_images(self.root)]
        if not self.samples:
            raise UserError(f"no images found in {self.root}; put files with one of the extensions "
                            f"{' '.join(IMG_EXTENSIONS)} there (optionally in one subfolder per class)")
        self.targets = [target for _, target in self.samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        try:
            with open(path, "rb") as f:
                image = Image.open(f).convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            warnings.warn(f"skipping unreadable image {path}: {e}")
            return None
        if self.transform is not None:
            image = self.transform_seeded(image, index)
        return image, target

    @property
    def epoch(self):
        return int(self.shared_epoch)

    def set_epoch(self, epoch):
        """Call before iterating the loader for `epoch`: its workers read the new value for every sample after."""
        self.shared_epoch.fill_(epoch)

    def transform_seeded(self, image, index):
        """With a seed, each (epoch, index) draws its own augmentation, so the crops an image gets do not depend
        on the number of workers or processes, and a resumed run sees exactly the crops it would have seen."""
        if self.seed is None:
            return self.transform(image)
        seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
        numpy_state, python_state = np.random.get_state(), random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):  # timm's transforms also draw from numpy and random
                torch.manual_seed(seed)
                np.random.seed(seed)
                random.seed(seed)
                return self.transform(image)
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)


def collate_skip_bad(batch):
    """default_collate over the readable samples; also returns how many were dropped so the run can report it."""
    good = [item for item in batch if item is not None]
    n_bad = len(batch) - len(good)
    if not good:
        return None, None, n_bad
    samples, targets = default_collate(good)
    return samples, targets, n_bad


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way: a run resumed mid-epoch skips the `start` samples of
    this process's share that it has trained on and sees the rest in the same order (MicroBatches sets `start`
    before each epoch's iterator is created; the sampler is iterated in the main process, persistent workers or
    not)."""

    start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return self.num_samples - self.start


def build_loader(dataset, batch_size, num_workers=None, shuffle=True, drop_last=True, seed=0, pin_memory=True):
    """DataLoader over this rank's shard; the caller calls loader.sampler.set_epoch(epoch) so that a resumed run
    sees the same order. Workers persist across epochs (restarting them cost seconds per epoch); ImageDataset's
    epoch is shared with them.
    num_workers=None picks min(10, CPUs), 10 being DINO's default. Memory is pinned only where CUDA is. Worker
    seeds come from the loader's own generator, so that creating an iterator (a run resumed mid-epoch creates one
    part-way) leaves the training's random stream as an uninterrupted run has it."""
    distributed = dist.is_available() and dist.is_initialized()
    num_replicas = dist.get_world_size() if distributed else 1
    rank = dist.get_rank() if distributed else 0
    sampler = ResumableSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
    if drop_last and len(sampler) < batch_size:
        where = getattr(dataset, "root", "the dataset")
        raise UserError(f"{where} gives {len(sampler)} images per process, fewer than the batch size {batch_size}; "
                        f"lower the batch size or add images")
    if num_workers is None:
        num_workers = min(10, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory and torch.cuda.is_available(), drop_last=drop_last,
                      collate_fn=collate_skip_bad, generator=torch.Generator().manual_seed(seed),
                      persistent_workers=num_workers > 0)


class MicroBatches:
    """An epoch's micro-batches as (iteration, first, last, batch), where iteration counts optimizer steps and
    first/last mark a step's first and last micro-batch; trailing micro-batches of an incomplete step are left out.
    Batches with no readable image are skipped, and `n_bad` counts the undecodable images.

    A run resumed mid-epoch starts after `start_step` optimizer steps (the loader's ResumableSampler skips their
    samples) with the n_bad it had counted; iterations are numbered as in an uninterrupted epoch."""

    def __init__(self, loader, steps_per_epoch, accum_iter, epoch, start_step=0, n_bad=0):
        self.loader, self.steps, self.accum, self.epoch = loader, steps_per_epoch, accum_iter, epoch
        self.start, self.n_bad = start_step * accum_iter, n_bad

    def __iter__(self):
        self.loader.sampler.start = self.start * self.loader.batch_size
        for i, (samples, targets, bad) in enumerate(self.loader, self.start):
            if i >= self.steps * self.accum:
                break
            self.n_bad += bad
            if samples is None:
                continue
            it = self.epoch * self.steps + i // self.accum
            yield it, i % self.accum == 0, (i + 1) % self.accum == 0, (samples, targets)
