"""Video segmentation by label propagation on frozen ViT patch features, DINO's DAVIS protocol, scored on the spot.

Object mode (DAVIS): the first frame's object masks travel through the video, each patch taking the labels of its
--topk most similar patches (exp(cos / 0.1)) within a --size_mask_neighborhood window of the first frame and the
--n_last_frames previous ones. Predictions are indexed PNGs in the DAVIS palette at <output_dir>/<seq>/<frame>.png,
then scored as davis2017-evaluation does (J and F mean, recall and decay, semi-supervised: first and last frames
left out): per-sequence_results-val.csv, global_results-val.csv and a printed table.

Semantic mode (--task semantic): a run of frames <run>/rgb/*.png with class-id labels <run>/semantic/*.png and a
classes.txt of `id name` lines; the labels of the reference frames (every --label_every-th, default only the first)
travel to the other frames, which are scored: per-class IoU, mean IoU, pixel accuracy, confusion matrix (CSV and a
printed table), with coloured prediction and error overlays as PNGs.

    python eval_video_segmentation.py --pretrained_weights dino_deitsmall16_pretrain.pth \\
        --data_path /path/to/DAVIS --output_dir runs/davis
    python eval_video_segmentation.py --task semantic --pretrained_weights runs/mae/checkpoint.pth \\
        --checkpoint_key model --data_path /path/to/camvid-seq --output_dir runs/camvid_mae
"""
import argparse
import csv
import io
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.checkpoint import check_writable, save_checkpoint
from core.config import bool_flag, parse_args
from core.device import DEVICES, PRECISIONS, autocast, resolve_device, resolve_precision
from core.errors import UserError, run_cli
from core.features import build_backbone
from core.log import TensorBoard, add_log_dir_arg, setup_logger
from core.video_segmentation import (LabelPropagation, check_size, colour_overlay, confusion_matrix, davis_palette,
                                     davis_statistics, error_overlay, frame_size, image_size, labels_to_mask,
                                     object_scores, one_hot_grid, patch_features, prepare_frame, read_classes,
                                     read_label_png, read_object_mask, read_rgb, save_indexed_png, semantic_scores)

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")
IGNORE_NAMES = ("void", "ignore", "unlabelled", "unlabeled")
DAVIS_MEASURES = ("J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")


def get_args_parser():
    p = argparse.ArgumentParser("Video segmentation by label propagation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, type=str,
                   help="Named configuration (section eval_video_segmentation of configs.yml).")
    p.add_argument("--pretrained_weights", default="", type=str,
                   help="Our DINO or MAE checkpoint, official DINO, backbone-only, timm ViT or DINOv2 weights. "
                        "Empty: a randomly initialised backbone (a baseline).")
    p.add_argument("--arch", default=None, type=str,
                   help="vit_tiny, vit_small, vit_base, vit_large or timm/<name>; default: the checkpoint's, else "
                        "vit_small (the original's default).")
    p.add_argument("--patch_size", default=None, type=int,
                   help="Patch size; default: the checkpoint's, else 16 (the original's default).")
    p.add_argument("--checkpoint_key", default="teacher", type=str,
                   help='Entry of a full checkpoint holding the backbone (e.g. "teacher", "student", "model").')
    p.add_argument("--output_dir", default=".", type=str, help="Where predictions and scores are written.")
    add_log_dir_arg(p, "the overall scores (J&F-Mean, J-Mean... or mIoU, pixel_accuracy, IoU/<class>)")
    p.add_argument("--data_path", default="/path/to/davis/", type=str,
                   help="Object mode: a DAVIS folder (JPEGImages/480p/<seq>/, Annotations/480p/<seq>/, optional "
                        "ImageSets/2017/val.txt). Semantic mode: a run folder (rgb/, semantic/) or a folder of runs.")
    p.add_argument("--n_last_frames", type=int, default=7, help="Number of preceding frames in the context.")
    p.add_argument("--size_mask_neighborhood", default=12, type=int,
                   help="Source patches are restricted to this many patches around the target (0: no window).")
    p.add_argument("--topk", type=int, default=5, help="Labels are accumulated from the top k neighbours.")
    p.add_argument("--bs", type=int, default=6,
                   help="Frames whose features are extracted together (lower it if memory runs out).")
    p.add_argument("--use_cuda", default=True, type=bool_flag,
                   help="false keeps everything on the CPU (as --device cpu); true leaves the choice to --device.")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto picks CUDA when present, else CPU.")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="Autocast for the backbone: auto is bf16 on CUDA GPUs that support it (else fp16), "
                        "fp32 on CPU. Affinities stay fp32.")
    p.add_argument("--short_side", default=480, type=int,
                   help="Frames are resized to this short side, the long side floored to a multiple of 64 (the "
                        "original's 480; smaller is faster and coarser).")
    p.add_argument("--task", default="object", choices=("object", "semantic"),
                   help="object: DAVIS video object segmentation; semantic: class-label propagation.")
    p.add_argument("--label_every", default=0, type=int,
                   help="Semantic mode: every N-th frame (0, N, 2N...) is a reference frame whose labels are given; "
                        "0: only the first. Propagation restarts from each reference frame.")
    p.add_argument("--ignore_index", default=None, type=int,
                   help="Semantic mode: label id excluded from propagation and scores; default: the class of "
                        "classes.txt named void/ignore/unlabelled (CamVid: 11), else 255.")
    p.add_argument("--classes", default=None, type=str,
                   help="Semantic mode: classes.txt; default: in the run folder, --data_path or the run's parent.")
    p.add_argument("--seed", default=0, type=int, help="Seed of the random backbone when no weights are given.")
    return p


# ----------------------------------------------------------------------------------------------------------------
# Inputs, all checked before anything is written


def frames_in(folder, suffixes):
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in suffixes) if Path(folder).is_dir() else []


def check_frames(frames, folder):
    if not frames:
        raise UserError(f"{folder} holds no frames: check --data_path")
    size = image_size(frames[0])
    for path in frames[1:]:
        if image_size(path) != size:
            raise UserError(f"frame {path} is {image_size(path)[1]}x{image_size(path)[0]} but {frames[0]} is "
                            f"{size[1]}x{size[0]}: the frames of one video must share a size")
    return size


def davis_sequences(root):
    """[(name, frames, {frame stem: mask path}, first-frame object ids)] of the DAVIS folder, every mask's size
    checked against its frame."""
    images, annotations = root / "JPEGImages" / "480p", root / "Annotations" / "480p"
    if not images.is_dir():
        raise UserError(f"{images} is not a folder: --data_path must be a DAVIS folder with JPEGImages/480p/<seq>/ "
                        f"and Annotations/480p/<seq>/")
    listing = root / "ImageSets" / "2017" / "val.txt"
    if listing.is_file():
        names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    else:
        names = sorted(d.name for d in images.iterdir() if d.is_dir())
    if not names:
        raise UserError(f"no sequence in {listing if listing.is_file() else images}: check --data_path")
    sequences = []
    for name in names:
        frames = frames_in(images / name, (".jpg",))
        size = check_frames(frames, images / name)
        masks = {p.stem: p for p in frames_in(annotations / name, (".png",))}
        if frames[0].stem not in masks:
            raise UserError(f"first-frame mask {annotations / name / (frames[0].stem + '.png')} is missing: every "
                            f"sequence needs the annotation of its first frame")
        for frame in frames:
            if frame.stem in masks:
                check_size(masks[frame.stem], image_size(masks[frame.stem]), frame, size)
        first = read_object_mask(masks[frames[0].stem])
        if first.max() == 0:
            raise UserError(f"first-frame mask {masks[frames[0].stem]} holds no object: give at least one object "
                            f"(ids 1..K in a palette mask, 255 in a binary mask)")
        sequences.append((name, frames, masks, first))
    return sequences


def semantic_runs(root):
    """Run folders: --data_path itself when it holds rgb/, else its subfolders that do."""
    if (root / "rgb").is_dir():
        return [root]
    runs = sorted(d for d in root.iterdir() if (d / "rgb").is_dir()) if root.is_dir() else []
    if not runs:
        raise UserError(f"{root} holds no rgb/ folder nor runs with one: --data_path must be a run folder "
                        f"(rgb/, semantic/) or a folder of runs")
    return runs


def class_table(args, root, run):
    """(class ids, names, ignore id, classes.txt path)."""
    candidates = [run / "classes.txt", root / "classes.txt", run.parent / "classes.txt"]
    if args.classes:
        candidates = [Path(args.classes)]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise UserError(f"no classes.txt found ({', '.join(map(str, candidates))}): write one with `id name` lines "
                        f"or give --classes")
    classes = read_classes(path)
    ignore = args.ignore_index
    if ignore is None:
        named = [c for c, name in classes if name.lower().split()[0].strip("()") in IGNORE_NAMES]
        ignore = named[0] if named else 255
    kept = [(c, name) for c, name in classes if c != ignore]
    if not kept:
        raise UserError(f"{path} lists no class besides the ignore id {ignore}: add the classes")
    return [c for c, _ in kept], [name for _, name in kept], ignore, path


def label_channels(path, lut, classes_path, ignore):
    """Channel index per pixel (len(classes) for ignored pixels); an unknown class id is an error."""
    labels = read_label_png(path)
    channels = lut[labels]
    if (channels < 0).any():
        bad = int(labels[channels < 0][0])
        raise UserError(f"{path} holds class id {bad}, which is not in {classes_path}: add it there or set "
                        f"--ignore_index {bad}")
    return channels


def check_semantic_run(run, lut, classes_path, ignore, label_every):
    """(frames, {frame stem: label path}, reference indices) with every label read and checked."""
    frames = frames_in(run / "rgb", FRAME_SUFFIXES)
    size = check_frames(frames, run / "rgb")
    labels = {p.stem: p for p in frames_in(run / "semantic", (".png",))}
    references = list(range(0, len(frames), label_every)) if label_every > 0 else [0]
    for i in references:
        if frames[i].stem not in labels:
            raise UserError(f"reference frame {frames[i]} has no label {run / 'semantic' / (frames[i].stem + '.png')}:"
                            f" add it, or choose --label_every so that reference frames are labelled")
    for frame in frames:
        if frame.stem in labels:
            check_size(labels[frame.stem], image_size(labels[frame.stem]), frame, size)
            label_channels(labels[frame.stem], lut, classes_path, ignore)
    return frames, labels, references


# ----------------------------------------------------------------------------------------------------------------
# Propagation


@torch.no_grad()
def stream_features(model, frames, args, device, precision):
    """(path, uint8 frame, patch features) frame by frame; --bs frames are decoded and embedded at once."""
    for start in range(0, len(frames), args.bs):
        chunk = frames[start:start + args.bs]
        rgbs = [read_rgb(p) for p in chunk]
        images = torch.stack([prepare_frame(x, args.short_side) for x in rgbs]).to(device)
        with autocast(device, precision):
            features = patch_features(model, images)
        yield from zip(chunk, rgbs, features)


class StagedFolder:
    """Outputs go to <output_dir>/.<name>.partial and replace <output_dir>/<name> only once complete."""

    def __init__(self, output_dir, name):
        self.final, self.path = output_dir / name, output_dir / f".{name}.partial"

    def __enter__(self):
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)
        return self.path

    def __exit__(self, kind, value, traceback):
        if kind is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return False
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.path, self.final)
        return False


def propagate_video(model, frames, references, initial_labels, args, device, precision):
    """Yield (index, path, uint8 frame, channel map or None for reference frames) over one video, propagation
    restarting from every reference frame with initial_labels(index, grid)."""
    patch, propagate = model.patch_size, None
    height, width = frame_size(*image_size(frames[0]), args.short_side)
    grid = (height // patch, width // patch)
    if min(grid) == 0:
        raise UserError(f"--short_side {args.short_side} makes {frames[0]} {width}x{height}, smaller than a "
                        f"{patch}-pixel patch: raise --short_side")
    for i, (path, rgb, features) in enumerate(stream_features(model, frames, args, device, precision)):
        if i in references:
            propagate = LabelPropagation(features, initial_labels(i, grid).to(device), grid, args.n_last_frames,
                                         args.topk, args.size_mask_neighborhood)
            yield i, path, rgb, None
            continue
        labels = propagate(features)
        yield i, path, rgb, labels_to_mask(labels, grid, patch, tuple(rgb.shape[1:]))


# ----------------------------------------------------------------------------------------------------------------
# Object mode (DAVIS)


def segment_davis(model, args, device, precision, output_dir, log):
    sequences = davis_sequences(Path(args.data_path))
    log.info(f"{len(sequences)} sequence(s), {sum(len(s[1]) for s in sequences)} frames")
    palette, rows = davis_palette(), []
    for number, (name, frames, masks, first) in enumerate(sequences, 1):
        num_objects, js, fs, start = int(first.max()), [], [], time.perf_counter()
        with StagedFolder(output_dir, name) as folder:
            save_indexed_png(folder / f"{frames[0].stem}.png", first, palette)
            for i, path, _, pred in propagate_video(model, frames, [0], lambda _, grid: one_hot_grid(
                    first, grid, num_objects + 1), args, device, precision):
                if pred is None:
                    continue
                save_indexed_png(folder / f"{path.stem}.png", pred, palette)
                # davis2017-evaluation's semi-supervised protocol leaves the first and last frames out.
                if i < len(frames) - 1 and path.stem in masks:
                    j, f = object_scores(read_object_mask(masks[path.stem]), pred, num_objects)
                    js.append(j)
                    fs.append(f)
        seconds = time.perf_counter() - start
        log.info(f"[{number}/{len(sequences)}] {name}: {len(frames)} frames, {num_objects} object(s), "
                 f"{len(frames) / seconds:.2f} frames/s")
        if js:
            for obj in range(num_objects):
                stats = davis_statistics([j[obj] for j in js]) + davis_statistics([f[obj] for f in fs])
                rows.append((f"{name}_{obj + 1}", *stats))
    return rows


def report_davis(rows, output_dir, log):
    if not rows:
        log.warning("no frame with a ground-truth mask between the first and the last: nothing scored")
        return None
    table = np.array([r[1:] for r in rows], dtype=np.float64)
    means = np.nanmean(table, axis=0)
    overall = dict(zip(DAVIS_MEASURES, means.tolist()))
    overall = {"J&F-Mean": (overall["J-Mean"] + overall["F-Mean"]) / 2, **overall}
    write_csv(output_dir / "global_results-val.csv", [list(overall)], [list(overall.values())])
    write_csv(output_dir / "per-sequence_results-val.csv", [["Sequence", *DAVIS_MEASURES]], rows)
    lines = [f"{'Sequence':<28}" + "".join(f"{m:>10}" for m in DAVIS_MEASURES)]
    lines += [f"{r[0]:<28}" + "".join(f"{v:>10.3f}" for v in r[1:]) for r in rows]
    lines.append(f"{'Global':<28}" + "".join(f"{v:>10.3f}" for v in means))
    log.info("DAVIS results (objects):\n" + "\n".join(lines) + f"\nJ&F-Mean {overall['J&F-Mean']:.3f}")
    return overall


# ----------------------------------------------------------------------------------------------------------------
# Semantic mode


def segment_semantic(model, args, device, precision, output_dir, log):
    root = Path(args.data_path)
    runs = semantic_runs(root)
    tables = [class_table(args, root, run) for run in runs]
    ids, names, ignore, classes_path = tables[0]
    if any(t[:3] != tables[0][:3] for t in tables[1:]):
        raise UserError(f"the runs of {root} have different classes.txt files: score them separately")
    lut = np.full(256, -1, dtype=np.int64)
    lut[ids] = np.arange(len(ids))
    if 0 <= ignore < 256:
        lut[ignore] = len(ids)
    class_ids = np.array(ids, dtype=np.uint8)
    checked = [check_semantic_run(run, lut, classes_path, ignore, args.label_every) for run in runs]
    every = f"every {args.label_every}th frame" if args.label_every else "the first frame only"
    log.info(f"{len(runs)} run(s), {len(ids)} classes, ignore id {ignore}, reference frames: {every}")
    palette, total = davis_palette(), np.zeros((len(ids), len(ids)), dtype=np.int64)
    for run, (frames, labels, references) in zip(runs, checked):
        def reference_labels(i, grid):
            return one_hot_grid(label_channels(labels[frames[i].stem], lut, classes_path, ignore), grid, len(ids))

        confusion, start = np.zeros_like(total), time.perf_counter()
        with StagedFolder(output_dir, run.name) as folder:
            (folder / "overlay").mkdir()
            (folder / "error").mkdir()
            for i, path, rgb, pred in propagate_video(model, frames, set(references), reference_labels, args, device,
                                                      precision):
                if pred is None:
                    continue
                pred_ids = class_ids[pred]
                image = rgb.permute(1, 2, 0).numpy()
                save_indexed_png(folder / f"{path.stem}.png", pred_ids, palette)
                Image.fromarray(colour_overlay(image, pred_ids, palette)).save(folder / "overlay" / f"{path.stem}.png")
                if path.stem in labels:
                    gt = label_channels(labels[path.stem], lut, classes_path, ignore)
                    confusion += confusion_matrix(gt, pred, len(ids))
                    Image.fromarray(error_overlay(image, gt, pred, len(ids))).save(folder / "error" /
                                                                                   f"{path.stem}.png")
        _, miou, accuracy = semantic_scores(confusion)
        log.info(f"{run.name}: {len(frames)} frames, {len(references)} reference(s), "
                 f"{len(frames) / (time.perf_counter() - start):.2f} frames/s, mIoU {miou:.4f}, pixel accuracy "
                 f"{accuracy:.4f}")
        total += confusion
    return ids, names, total


def report_semantic(ids, names, confusion, output_dir, log):
    if confusion.sum() == 0:
        log.warning("no labelled frame besides the reference frames: nothing scored")
        return None
    iou, miou, accuracy = semantic_scores(confusion)
    rows = [[c, name, iou[k], int(confusion[k].sum()), int(confusion[:, k].sum())]
            for k, (c, name) in enumerate(zip(ids, names))]
    rows += [["", "mean IoU", miou, "", ""], ["", "pixel accuracy", accuracy, "", ""]]
    write_csv(output_dir / "semantic_results.csv", [["id", "class", "IoU", "gt_pixels", "pred_pixels"]], rows)
    write_csv(output_dir / "confusion_matrix.csv", [["gt \\ pred", *names]],
              [[name, *row] for name, row in zip(names, confusion.tolist())])
    lines = [f"{'id':>4} {'class':<20}{'IoU':>8}"]
    lines += [f"{c:>4} {name:<20}{v:>8.4f}" for c, name, v in zip(ids, names, iou)]
    lines += [f"{'':>4} {'mean IoU':<20}{miou:>8.4f}", f"{'':>4} {'pixel accuracy':<20}{accuracy:>8.4f}"]
    log.info("semantic propagation results (frames not labelled at inference):\n" + "\n".join(lines))
    return {"mIoU": miou, "pixel_accuracy": accuracy, "IoU": dict(zip(names, iou.tolist()))}


def write_csv(path, header, rows):
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerows(header)
    writer.writerows([[f"{v:.5f}" if isinstance(v, float) and not math.isnan(v) else v for v in row]
                      for row in rows])
    save_checkpoint(text.getvalue(), path, write=lambda s, f: f.write(s.encode()))


def main(args):
    if not args.use_cuda and args.device == "auto":
        args.device = "cpu"
    for flag in ("n_last_frames", "size_mask_neighborhood", "label_every"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} must be 0 or more")
    if args.topk < 1 or args.bs < 1 or args.short_side < 1:
        raise UserError("--topk, --bs and --short_side must be positive")
    log = setup_logger()
    device = resolve_device(args.device)
    precision = resolve_precision(device, args.precision)
    torch.manual_seed(args.seed)
    output_dir = Path(args.output_dir)
    check_writable(output_dir)
    tb = TensorBoard(args.log_dir)
    model, description = build_backbone(args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size)
    if args.pretrained_weights:
        log.info(f"backbone: {description}")
    else:
        log.warning(f"WARNING: no --pretrained_weights: propagating with a {description} backbone (a random "
                    f"baseline)")
    model.to(device)
    if args.task == "object":
        results = report_davis(segment_davis(model, args, device, precision, output_dir, log), output_dir, log)
    else:
        results = report_semantic(*segment_semantic(model, args, device, precision, output_dir, log), output_dir,
                                  log)
    tb.add(0, results or {})
    tb.close()
    return results


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(get_args_parser(), "eval_video_segmentation")))
