"""The embedded default dataset: small shape images drawn by code, so the project runs with no download.

A class is a shape or a pattern; its brightness, position, size, rotation, the background's grey level and the noise
are random per image, so intensity says nothing about the class and features must capture structure. Colours are
nearly grey and backgrounds flat on purpose: a vivid hue or a gradient would be a per-image cue that survives
DINO's augmentations, which self-supervision latches onto instead of the shape.
"""
import colorsys
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from core.errors import UserError

CLASSES = ("circle", "square", "triangle", "ring", "cross", "star",
           "horizontal_stripes", "vertical_stripes", "checkerboard", "dots")
SIZE = 64
SCALE = 4  # shapes are drawn at SCALE x SIZE and box-downsampled, which antialiases their edges
MARKER = "dataset.json"


def default_data_dir():
    """Outside the repository, versioned so that a change of the generator never reuses stale images."""
    return Path(os.environ.get("DINOSSL_DATA_CACHE", Path.home() / ".cache" / "dinossl" / "default-data-v2"))


def shape_colour(rng):
    """A light, barely tinted grey: the shape stands out from the darker background whatever its brightness."""
    return np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.2), rng.uniform(0.6, 1.0))) * 255


def polygon(cx, cy, radii, angle):
    """Vertices at evenly spaced angles, one radius per vertex (a star alternates outer and inner radii)."""
    thetas = angle + 2 * np.pi * np.arange(len(radii)) / len(radii)
    return [(cx + r * np.cos(t), cy + r * np.sin(t)) for r, t in zip(radii, thetas)]


def pattern_mask(name, rng, n):
    """A full-canvas boolean pattern; the caller keeps it inside a random rectangle."""
    period = rng.uniform(0.12, 0.25) * n
    phase = rng.uniform(0, period, 2)
    y, x = np.ogrid[0:n, 0:n]
    wave_x = ((x + phase[0]) % period) < period / 2
    wave_y = ((y + phase[1]) % period) < period / 2
    if name == "horizontal_stripes":
        return wave_y
    if name == "vertical_stripes":
        return wave_x
    if name == "checkerboard":
        return wave_x ^ wave_y
    cx = (x + phase[0]) % period - period / 2
    cy = (y + phase[1]) % period - period / 2
    return cx ** 2 + cy ** 2 < (period * 0.28) ** 2


def draw_shape(name, rng, n):
    """The class instance as a high-resolution mask (mode L, 255 inside)."""
    mask = Image.new("L", (n, n))
    draw = ImageDraw.Draw(mask)
    r = rng.uniform(0.25, 0.42) * n
    cx, cy = rng.uniform(r, n - r, 2)
    angle = rng.uniform(0, 2 * np.pi)
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif name == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=255, width=int(r * rng.uniform(0.2, 0.35)))
    elif name == "square":
        draw.polygon(polygon(cx, cy, [r] * 4, angle), fill=255)
    elif name == "triangle":
        draw.polygon(polygon(cx, cy, [r] * 3, angle), fill=255)
    elif name == "star":
        draw.polygon(polygon(cx, cy, [r, r * 0.4] * 5, angle), fill=255)
    elif name == "cross":
        arm = r * rng.uniform(0.25, 0.4)
        bar = np.array(polygon(0, 0, [1] * 4, np.pi / 4)) * [r * np.sqrt(2), arm * np.sqrt(2)]
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        for turn in (rot, rot @ [[0, -1], [1, 0]]):
            draw.polygon([tuple(p) for p in bar @ turn.T + [cx, cy]], fill=255)
    else:
        x0, y0 = rng.uniform(0, 0.2 * n, 2)
        w, h = rng.uniform(0.6 * n, n - max(x0, y0), 2)
        box = np.zeros((n, n), dtype=bool)
        box[int(y0):int(y0 + h), int(x0):int(x0 + w)] = True
        mask = Image.fromarray((pattern_mask(name, rng, n) & box).astype(np.uint8) * 255)
    return mask


def background(rng, n):
    """A flat dark grey with a faint tint."""
    return np.full((n, n, 3), rng.uniform(10, 80)) + rng.normal(0, 4, 3)


def render(name, rng):
    """One SIZE x SIZE RGB image of class `name`: an antialiased shape over a background, plus pixel noise."""
    alpha = np.asarray(draw_shape(name, rng, SIZE * SCALE).resize((SIZE, SIZE), Image.BOX), float)[..., None] / 255
    image = background(rng, SIZE) * (1 - alpha) + shape_colour(rng) * alpha
    image += rng.normal(0, rng.uniform(2, 10), image.shape)
    return Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8))


def generate(folder, counts):
    """Write split/class/index.png; each image's RNG is seeded by (split, class, index) for determinism."""
    for split_id, (split, count) in enumerate(counts.items()):
        for class_id, name in enumerate(CLASSES):
            out = folder / split / name
            out.mkdir(parents=True)
            for i in range(count):
                rng = np.random.default_rng([split_id, class_id, i])
                render(name, rng).save(out / f"{i:05d}.png")


def generate_atomically(root, counts, meta):
    """Write into a temporary sibling and rename it into place, so an interrupted run never leaves a partial
    dataset at `root`; when two processes race, the first rename wins and the other's fails and is discarded."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        generate(tmp, counts)
        (tmp / MARKER).write_text(json.dumps(meta))
        os.rename(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_default_data(root=None, train_per_class=240, val_per_class=60):
    """Generate the default dataset (ImageFolder layout root/{train,val}/<class>/*.png) once, then reuse it."""
    root = Path(root) if root is not None else default_data_dir()
    meta = {"classes": list(CLASSES), "size": SIZE, "train_per_class": train_per_class, "val_per_class": val_per_class}
    if root.exists() and not (root / MARKER).exists():
        raise UserError(f"{root} exists but is not a complete default dataset; delete it or set DINOSSL_DATA_CACHE "
                        f"to another folder")
    if not (root / MARKER).exists():
        try:
            generate_atomically(root, {"train": train_per_class, "val": val_per_class}, meta)
        except OSError as e:
            if not (root / MARKER).exists():
                raise UserError(f"could not write the default dataset to {root} ({e}); free some space or set "
                                f"DINOSSL_DATA_CACHE to a writable folder") from e
    found = json.loads((root / MARKER).read_text())
    if found != meta:
        raise UserError(f"default data at {root} was generated with other settings ({found}); "
                        f"delete that folder or set DINOSSL_DATA_CACHE to another one")
    return root
