"""Copy detection on Copydays (Jegou et al., 2008), the DINO protocol: images resized to --imsize x --imsize
(bicubic), descriptor = the last block's normed [CLS] token concatenated with GeM (p=4) of its patch tokens,
optional distractors added to the database, optional whitening learned on --whitening_path (centred by those images'
mean, eigen-decomposition of their second-moment matrix, power 0.5), L2 normalisation, the 20 nearest database
images per query, the Holidays trapezoidal AP per query and the mAP of every block; `strong` is the paper's number.

Data layouts:
  Copydays, as the original reads it: <data_path>/original/*.jpg (the database), and the query blocks strong/,
    jpegqual/<3..75>/, crops/<10..80>/ (*.jpg); a query of strong/ matches the originals whose file names share its
    first 4 characters, one of any other block the original at the same position in sorted order. Blocks that are
    absent are skipped.
  Your own copies (a folder without strong/, jpegqual/ or crops/): <data_path>/original/ with the originals and any
    other folders (at any depth) with copies; a copy matches the original of the same file stem, or whose stem
    followed by "_" begins its own (original/cat.jpg <- blur/cat.jpg, blur/cat_2.png). Each folder is a block.
--distractors_path and --whitening_path are folders of images (searched recursively); left at their placeholder
defaults they are not used, as in the original.

    python eval_copy_detection.py --data_path /data/copydays --whitening_path /data/yfcc20k \
        --distractors_path /data/yfcc10k --pretrained_weights dino_vitbase8_pretrain.pth
"""
import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from core import distributed as dist
from core.checkpoint import load_file, save_checkpoint
from core.config import add_launcher_args, bool_flag, parse_args
from core.data import list_images
from core.device import DEVICES, PRECISIONS
from core.errors import UserError, run_cli
from core.features import ImageList, build_backbone, extract_list_features, init_eval
from core.log import TensorBoard, add_log_dir_arg, setup_logger
from core.retrieval import (apply_whitening, copy_detection_descriptor, copy_detection_transform, learn_whitening,
                            search, trapezoid_ap)

COPYDAYS_BLOCKS = (["original", "strong"] + [f"jpegqual/{q}" for q in (3, 5, 8, 10, 15, 20, 30, 50, 75)]
                   + [f"crops/{c}" for c in (10, 15, 20, 30, 40, 50, 60, 70, 80)])
PLACEHOLDERS = {"whitening_path": "/path/to/whitening_data/", "distractors_path": "/path/to/distractors/"}
TOPK = 20
FEATURES_FILE = "copy_detection_features.pth"


def get_args_parser():
    p = argparse.ArgumentParser("Copy detection on Copydays", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default="/path/to/copydays/", type=str,
                   help="Copydays (https://lear.inrialpes.fr/~jegou/data.php#copydays) or your own copies; see above.")
    p.add_argument("--whitening_path", default=PLACEHOLDERS["whitening_path"], type=str,
                   help="Images for learning the whitening (the paper: 20k random YFCC100M images).")
    p.add_argument("--distractors_path", default=PLACEHOLDERS["distractors_path"], type=str,
                   help="Distractor images added to the database (the paper: 10k random YFCC100M images).")
    p.add_argument("--imsize", default=320, type=int, help="Side of the square images.")
    p.add_argument("--batch_size_per_gpu", default=16, type=int, help="Images per process and per step.")
    p.add_argument("--pretrained_weights", default="", type=str,
                   help="Our or official DINO checkpoint, backbone-only file or DINOv2 state dict. Empty: a randomly "
                        "initialised backbone, as a baseline (nothing is downloaded).")
    p.add_argument("--use_cuda", default=True, type=bool_flag,
                   help="false runs on the CPU (same as --device cpu); true uses --device.")
    p.add_argument("--arch", default=None, type=str,
                   help="vit_tiny, vit_small, vit_base or vit_large; default: the checkpoint's, else vit_base (the "
                        "original's default).")
    p.add_argument("--patch_size", default=None, type=int,
                   help="Patch size; default: the checkpoint's, else 8 (the original's default).")
    p.add_argument("--checkpoint_key", default="teacher", type=str,
                   help='Entry of a full checkpoint holding the backbone (e.g. "teacher").')
    p.add_argument("--num_workers", default=10, type=int, help="Data loading processes per GPU.")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto picks CUDA when present, else CPU.")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="Autocast for the backbone: auto is the device's mixed precision on CUDA, fp32 on CPU.")
    p.add_argument("--dump_features", default=None, type=str,
                   help=f"Folder where {FEATURES_FILE} (features and the blocks' ground truth) is saved.")
    p.add_argument("--load_features", default=None, type=str,
                   help=f"Folder with a {FEATURES_FILE} from --dump_features: no backbone, no images.")
    p.add_argument("--output_dir", default=None, type=str, help="Folder where copy_detection.json goes.")
    add_log_dir_arg(p, "the mAP of every block (mAP/strong, mAP/original...)")
    p.add_argument("--seed", default=0, type=int, help="Seed of the random backbone.")
    add_launcher_args(p)
    return p


def images_in(folder, jpg_only=False):
    """Image files directly in `folder`, sorted by name (Copydays blocks: .jpg only, as the original lists them)."""
    if jpg_only:
        return sorted(p for p in folder.iterdir() if p.name.endswith(".jpg"))
    return sorted(p for p in folder.iterdir() if p.is_file() and has_file_allowed_extension(p.name, IMG_EXTENSIONS))


def copydays_blocks(root, originals):
    """[(block name, query paths, positives per query)] with the original's matching rules."""
    blocks = []
    for name in COPYDAYS_BLOCKS:
        if not (root / name).is_dir():
            continue
        queries = images_in(root / name, jpg_only=True)
        if name == "strong":
            positives = [[j for j, o in enumerate(originals) if o.name[:4] == q.name[:4]] for q in queries]
            unmatched = [q for q, pos in zip(queries, positives) if not pos]
            if unmatched:
                raise UserError(f"{unmatched[0]} shares its first 4 characters with no image of original/: Copydays "
                                f"names a strong copy after its original (2000xx.jpg for 200000.jpg)")
        elif len(queries) != len(originals):
            raise UserError(f"{root / name} has {len(queries)} images but original/ has {len(originals)}: a Copydays "
                            f"block holds one copy of every original")
        else:
            positives = [[i] for i in range(len(queries))]
        blocks.append((name, queries, positives))
    return blocks


def folder_blocks(root, originals):
    """[(block name, query paths, positives per query)] for a user folder: copies matched by file stem."""
    stems = {}
    for j, o in enumerate(originals):
        stems.setdefault(o.stem, []).append(j)
    folders = sorted({Path(p).parent for p in list_images(root) if root / "original" not in Path(p).parents})
    blocks = []
    for folder in folders:
        queries = images_in(folder)
        positives = [[j for stem, js in stems.items() if q.stem == stem or q.stem.startswith(stem + "_") for j in js]
                     for q in queries]
        unmatched = [q for q, pos in zip(queries, positives) if not pos]
        if unmatched:
            raise UserError(f"copy {unmatched[0]} is named after no image of {root / 'original'}: name each copy "
                            f"<original stem>.<ext> or <original stem>_<anything>.<ext>")
        blocks.append((folder.relative_to(root).as_posix(), queries, positives))
    return blocks


def read_copies(data_path):
    """(original paths, blocks) of a Copydays folder or of a user's folder of copies."""
    root = Path(data_path)
    if not (root / "original").is_dir():
        raise UserError(f"{root / 'original'} is not a folder: --data_path must hold original/ with the originals "
                        f"and the copies in other folders (Copydays' layout, see --help)")
    copydays = any((root / name).is_dir() for name in ("strong", "jpegqual", "crops"))
    originals = images_in(root / "original", jpg_only=copydays)
    if not originals:
        raise UserError(f"no images in {root / 'original'}: put the original images there")
    blocks = (copydays_blocks if copydays else folder_blocks)(root, originals)
    blocks = [b for b in blocks if b[1]]
    if not blocks:
        raise UserError(f"no copies found in {root}: put the copies in folders beside original/")
    return originals, blocks


def optional_folder(args, name):
    """The images of --whitening_path / --distractors_path; none when left at the placeholder or empty."""
    value = getattr(args, name)
    if not value or (value == PLACEHOLDERS[name] and not Path(value).is_dir()):
        return []
    if not Path(value).is_dir():
        raise UserError(f"--{name} {value} is not a folder: give a folder of images, or leave the flag out")
    images = list_images(value)
    if not images:
        raise UserError(f"--{name} {value} holds no images: add some, or leave the flag out")
    return images


def extract(args, model, paths, device, precision):
    dataset = ImageList(paths, copy_detection_transform(args.imsize))
    return extract_list_features(lambda x: copy_detection_descriptor(model, x), dataset, [0] * len(paths), device,
                                 precision, args.batch_size_per_gpu, args.num_workers)


def extract_all(args, device, precision, log):
    """The features and ground truth that evaluate() needs, as a dict (the --dump_features content)."""
    originals, blocks = read_copies(args.data_path)
    distractors, whitening = optional_folder(args, "distractors_path"), optional_folder(args, "whitening_path")
    if args.pretrained_weights:
        model, description = build_backbone(args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size,
                                            img_size=args.imsize)
        log.info(f"backbone: {description}")
    else:
        model, description = build_backbone(None, arch=args.arch or "vit_base", patch_size=args.patch_size or 8,
                                            img_size=args.imsize)
        log.warning(f"WARNING: no --pretrained_weights: evaluating a {description} backbone (a random baseline)")
    model.to(device)
    queries = [q for _, paths, _ in blocks for q in paths]
    log.info(f"{len(queries)} queries in {len(blocks)} blocks, {len(originals)} originals, {len(distractors)} "
             f"distractors, {len(whitening)} whitening images; {dist.get_world_size()} process(es) on {device}")
    return {"queries": extract(args, model, queries, device, precision),
            "database": extract(args, model, list(originals) + distractors, device, precision),
            "whitening": extract(args, model, whitening, device, precision) if whitening else torch.zeros(0),
            "blocks": [name for name, _, _ in blocks], "block_sizes": [len(paths) for _, paths, _ in blocks],
            "positives": [pos for _, _, positives in blocks for pos in positives]}


def load_dump(folder):
    saved = load_file(Path(folder) / FEATURES_FILE)
    keys = {"queries", "database", "whitening", "blocks", "block_sizes", "positives"}
    if not isinstance(saved, dict) or not keys <= set(saved) or len(saved["queries"]) != len(saved["positives"]) \
            or sum(saved["block_sizes"]) != len(saved["queries"]):
        raise UserError(f"{folder}/{FEATURES_FILE} is not a copy-detection feature dump: write one with "
                        f"--dump_features")
    return saved


def evaluate(features, log=None):
    """{block: mAP} after the optional whitening, L2 normalisation and the top-20 search."""
    queries, database = features["queries"].float(), features["database"].float()
    if len(features["whitening"]):
        mean, projection = learn_whitening(features["whitening"])
        if log and len(features["whitening"]) < database.shape[1]:
            log.warning(f"whitening learned from {len(features['whitening'])} images for {database.shape[1]} "
                        f"dimensions: use more whitening images than dimensions")
        queries, database = apply_whitening(queries, mean, projection), apply_whitening(database, mean, projection)
    _, ranked = search(F.normalize(database, dim=1), F.normalize(queries, dim=1), TOPK)
    aps = [trapezoid_ap([r for r, b in enumerate(row) if b in set(pos)], len(pos))
           for row, pos in zip(ranked.tolist(), features["positives"])]
    results, start = {}, 0
    for name, size in zip(features["blocks"], features["block_sizes"]):
        results[name] = sum(aps[start:start + size]) / size
        start += size
    return results


def main(args):
    if args.imsize < 1 or args.batch_size_per_gpu < 1:
        raise UserError("--imsize and --batch_size_per_gpu must be positive")
    if not args.use_cuda:
        args.device = "cpu"
    device, precision = init_eval(args)
    log = setup_logger()
    tb = TensorBoard(args.log_dir)
    features = load_dump(args.load_features) if args.load_features else extract_all(args, device, precision, log)
    results = None
    if dist.is_main_process():
        if args.dump_features:
            save_checkpoint(features, Path(args.dump_features) / FEATURES_FILE)
            log.info(f"features saved to {args.dump_features}/{FEATURES_FILE}")
        results = evaluate(features, log)
        for name, value in results.items():
            log.info(f"eval on {name} mAP={value:.3f}")
        if "strong" in results:
            log.info(f">> Copydays strong mAP: {100 * results['strong']:.2f}")
        if args.output_dir:
            record = json.dumps({"mAP": results, "strong": results.get("strong")}, indent=1) + "\n"
            save_checkpoint(record, Path(args.output_dir) / "copy_detection.json",
                            write=lambda text, f: f.write(text.encode()))
        tb.add(0, {"mAP": results})
    tb.close()
    dist.barrier()
    dist.cleanup()
    return results


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(get_args_parser(), "eval_copy_detection")))
