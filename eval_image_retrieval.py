"""Image retrieval on Revisited Oxford and Paris (Radenovic et al., 2018), the DINO protocol: every image shrunk so
that its longer side is --imsize (aspect kept), whole query images (--query_bbx crops them to their box, as revisitop
prescribes), the backbone's [CLS] embedding (--multiscale: averaged over scales 1, 1/sqrt(2), 1/2, then
L2-normalised), cosine ranking of the whole database, mAP and mP@1/5/10 in the Medium and Hard setups, junk images
ignored as revisitop's compute_map does.

Data layout, the original's: <data_path>/<dataset>/gnd_<dataset>.pkl and <data_path>/<dataset>/jpg/<name>.jpg for
every name of its imlist and qimlist (roxford5k, rparis6k). Your own set <name>: <data_path>/<name>/jpg/ with your
images and <data_path>/<name>/gnd_<name>.json:
    {"queries": [{"image": "q1.jpg", "positives": ["a.jpg"], "junk": ["b.jpg"]},
                 {"image": "q2.jpg", "positives": ["c.jpg"], "hard": ["d.jpg"], "bbx": [10, 20, 200, 180]}],
     "database": ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]}
File names are relative to jpg/. "positives" are revisitop's easy images; "hard", "junk" and "bbx" (left, top,
right, bottom in pixels) are optional; without "database", every image in jpg/ that is not a query is searched. The
Hard setup is reported when some query has hard positives.

    python eval_image_retrieval.py --data_path /data/revisitop --dataset roxford5k \
        --pretrained_weights dino_vitsmall16_googlelandmark_pretrain.pth --multiscale true
    torchrun --nproc_per_node 8 eval_image_retrieval.py --data_path /data/revisitop --dataset rparis6k ...
"""
import argparse
import json
import pickle
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from PIL import Image

from core import distributed as dist
from core.checkpoint import load_file, save_checkpoint
from core.config import add_launcher_args, bool_flag, parse_args
from core.data import list_images
from core.device import DEVICES, PRECISIONS
from core.errors import UserError, run_cli
from core.features import ImageList, build_backbone, extract_list_features, init_eval
from core.log import TensorBoard, add_log_dir_arg, setup_logger
from core.retrieval import KAPPAS, compute_map, multiscale, protocol_gnd, retrieval_transform, search

FEATURES_FILE = "retrieval_features.pth"
# Classes a revisitop gnd pickle may hold besides plain lists and numbers (older copies store numpy arrays).
PICKLE_ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                  ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                  ("numpy._core.multiarray", "scalar")}


def get_args_parser():
    p = argparse.ArgumentParser("Image Retrieval on revisited Paris and Oxford", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default="/path/to/revisited_paris_oxford/", type=str,
                   help="Folder holding <dataset>/gnd_<dataset>.pkl (or .json) and <dataset>/jpg/.")
    p.add_argument("--dataset", default="roxford5k", type=str,
                   help="roxford5k, rparis6k, or the name of your own set (see the layout above).")
    p.add_argument("--multiscale", default=False, type=bool_flag, help="Average over scales 1, 1/sqrt(2), 1/2.")
    p.add_argument("--imsize", default=224, type=int, help="Longer side of every image after shrinking.")
    p.add_argument("--query_bbx", default=False, type=bool_flag,
                   help="Crop queries to their bbx, as the revisitop protocol prescribes (DINO's script does not); "
                        "a query without one is used whole.")
    p.add_argument("--pretrained_weights", default="", type=str,
                   help="Our or official DINO checkpoint, backbone-only file, timm ViT or DINOv2 state dict. Empty: a "
                        "randomly initialised backbone, as a baseline (nothing is downloaded).")
    p.add_argument("--use_cuda", default=True, type=bool_flag,
                   help="false runs on the CPU (same as --device cpu); true uses --device.")
    p.add_argument("--arch", default=None, type=str,
                   help="vit_tiny, vit_small, vit_base, vit_large or timm/<name>; default: the checkpoint's, else "
                        "vit_small (the original's default).")
    p.add_argument("--patch_size", default=None, type=int, help="Patch size; default: the checkpoint's, else 16.")
    p.add_argument("--checkpoint_key", default="teacher", type=str,
                   help='Entry of a full checkpoint holding the backbone (e.g. "teacher").')
    p.add_argument("--batch_size_per_gpu", default=16, type=int,
                   help="Images of the same size run together (the features do not change); 1: the original's "
                        "one image at a time.")
    p.add_argument("--num_workers", default=10, type=int, help="Data loading processes per GPU.")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto picks CUDA when present, else CPU.")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="Autocast for the backbone: auto is the device's mixed precision on CUDA, fp32 on CPU.")
    p.add_argument("--search", default="auto", choices=("auto", "torch", "faiss"),
                   help="Nearest-neighbour search: auto uses faiss for databases of 100k images and more.")
    p.add_argument("--topk", default=None, type=int,
                   help="Rank only the first K database images per query (for millions of images); positives "
                        "below K count as not retrieved. Default: the whole database, exact.")
    p.add_argument("--dump_features", default=None, type=str,
                   help=f"Folder where {FEATURES_FILE} (features and ground truth) is saved.")
    p.add_argument("--load_features", default=None, type=str,
                   help=f"Folder with a {FEATURES_FILE} from --dump_features: no backbone, no images.")
    p.add_argument("--output_dir", default=None, type=str, help="Folder where retrieval.json with the scores goes.")
    add_log_dir_arg(p, "mAP and mP@k per setting (medium/mAP, hard/mP@10...)")
    p.add_argument("--seed", default=0, type=int, help="Seed of the random backbone.")
    add_launcher_args(p)
    return p


class PlainUnpickler(pickle.Unpickler):
    """A gnd file is data: lists, dicts, numbers and at most numpy arrays; anything else is refused, not run."""

    def find_class(self, module, name):
        if (module, name) in PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a ground-truth file")


def read_pkl(path):
    try:
        with open(path, "rb") as f:
            return PlainUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise UserError(f"cannot read ground truth {path} ({e}): use revisitop's gnd_<dataset>.pkl") from e


def ids(values):
    return [int(v) for v in np.asarray(values, dtype=np.int64).reshape(-1)]


def revisitop_ground_truth(path, folder):
    """(database paths, query paths, gnd) from revisitop's pickle: names without extension, '.jpg' appended."""
    cfg = read_pkl(path)
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        raise UserError(f"{path} lacks imlist, qimlist or gnd: use revisitop's gnd_<dataset>.pkl")
    try:
        gnd = [{"easy": ids(g.get("easy", [])), "hard": ids(g.get("hard", [])), "junk": ids(g.get("junk", [])),
                "bbx": [float(v) for v in g["bbx"]] if g.get("bbx") is not None else None} for g in cfg["gnd"]]
    except (AttributeError, TypeError, ValueError) as e:
        raise UserError(f"{path} has a malformed gnd entry ({e}): use revisitop's gnd_<dataset>.pkl") from e
    return ([folder / f"{name}.jpg" for name in cfg["imlist"]], [folder / f"{name}.jpg" for name in cfg["qimlist"]],
            gnd)


def json_ground_truth(path, folder):
    """(database paths, query paths, gnd) from a user's JSON (layout in the module docstring)."""
    try:
        spec = json.loads(path.read_text())
        queries = spec["queries"]
        names = [q["image"] for q in queries]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read ground truth {path} ({type(e).__name__}: {e}): it must be JSON with a "
                        f"'queries' list of objects with 'image' and 'positives' (see --help)") from e
    database = spec.get("database")
    if database is None:
        database = sorted(set(str(Path(p).relative_to(folder)) for p in list_images(folder)) - set(names))
    index = {name: i for i, name in enumerate(database)}
    gnd = []
    for q in queries:
        unknown = [n for key in ("positives", "hard", "junk") for n in q.get(key, []) if n not in index]
        if unknown:
            raise UserError(f"{path}: query {q['image']} lists {unknown[0]}, which is not in the database: fix the "
                            f"name or add it to 'database'")
        gnd.append({"easy": [index[n] for n in q.get("positives", [])], "hard": [index[n] for n in q.get("hard", [])],
                    "junk": [index[n] for n in q.get("junk", [])], "bbx": q.get("bbx")})
    return [folder / n for n in database], [folder / n for n in names], gnd


def read_ground_truth(data_path, dataset):
    """(database paths, query paths, gnd) with every listed image checked to exist."""
    root = Path(data_path) / dataset
    pkl, js, folder = root / f"gnd_{dataset}.pkl", root / f"gnd_{dataset}.json", root / "jpg"
    if pkl.is_file():
        database, queries, gnd = revisitop_ground_truth(pkl, folder)
    elif js.is_file():
        database, queries, gnd = json_ground_truth(js, folder)
    else:
        raise UserError(f"ground truth {pkl} not found: --data_path must hold {dataset}/gnd_{dataset}.pkl (revisitop) "
                        f"or {dataset}/gnd_{dataset}.json, and {dataset}/jpg/ with the images")
    if len(gnd) != len(queries) or not database or not queries:
        raise UserError(f"{root}: the ground truth needs one gnd entry per query and a non-empty database")
    if any(i < 0 or i >= len(database) for g in gnd for key in ("easy", "hard", "junk") for i in g[key]):
        raise UserError(f"{root}: the ground truth names database indices outside 0..{len(database) - 1}: fix it")
    missing = [p for p in database + queries if not p.is_file()]
    if missing:
        raise UserError(f"image {missing[0]} listed in the ground truth is missing ({len(missing)} missing in all): "
                        f"put the {dataset} images in {folder}")
    return database, queries, gnd


def size_key(path, box=None):
    """An image's size read from its header (no decoding), or its box's: images of one key batch together."""
    if box is not None:
        return round(box[2]) - round(box[0]), round(box[3]) - round(box[1])
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def extract(args, model, paths, boxes, device, precision):
    embed = (lambda x: multiscale(model, x)) if args.multiscale else model
    dataset = ImageList(paths, retrieval_transform(args.imsize), boxes)
    keys = [size_key(p, b) for p, b in zip(paths, boxes or [None] * len(paths))]
    return extract_list_features(embed, dataset, keys, device, precision, args.batch_size_per_gpu, args.num_workers)


def features_and_gnd(args, device, precision, log):
    """(database features, query features, gnd), from a --load_features dump or extracted with the backbone."""
    if args.load_features:
        saved = load_file(Path(args.load_features) / FEATURES_FILE)
        if not isinstance(saved, dict) or not {"database", "queries", "gnd"} <= set(saved) \
                or len(saved["queries"]) != len(saved["gnd"]):
            raise UserError(f"{args.load_features}/{FEATURES_FILE} is not a retrieval feature dump: write one with "
                            f"--dump_features")
        log.info(f"loaded features of {saved.get('dataset', '?')} from {args.load_features}")
        return saved["database"].float(), saved["queries"].float(), saved["gnd"]
    database, queries, gnd = read_ground_truth(args.data_path, args.dataset)
    model, description = build_backbone(args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size,
                                        img_size=args.imsize)
    if args.pretrained_weights:
        log.info(f"backbone: {description}")
    else:
        log.warning(f"WARNING: no --pretrained_weights: evaluating a {description} backbone (a random baseline)")
    model.to(device)
    log.info(f"{args.dataset}: {len(database)} database images, {len(queries)} queries; "
             f"{dist.get_world_size()} process(es) on {device}")
    boxes = [g["bbx"] for g in gnd] if args.query_bbx else None
    database_features = extract(args, model, database, None, device, precision)
    query_features = extract(args, model, queries, boxes, device, precision)
    return database_features, query_features, gnd


def evaluate(database, queries, gnd, topk=None, backend="auto"):
    """{setup: {"mAP": %, "mP@k": %...}} for the Medium and (when some query has hard positives) Hard setups."""
    database, queries = F.normalize(database.float(), dim=1), F.normalize(queries.float(), dim=1)
    _, ranks = search(database, queries, topk or len(database), backend)
    setups = ("medium", "hard") if any(g["hard"] for g in gnd) else ("medium",)
    results = {}
    for setup in setups:
        mean_ap, _, mean_pr, _ = compute_map(ranks.numpy(), protocol_gnd(gnd, setup), KAPPAS)
        results[setup] = {"mAP": 100 * mean_ap, **{f"mP@{k}": 100 * p for k, p in zip(KAPPAS, mean_pr)}}
    return results


def write_json(path, record):
    save_checkpoint(record, path, write=lambda obj, f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def main(args):
    if args.imsize < 1 or args.batch_size_per_gpu < 1 or (args.topk is not None and args.topk < 1):
        raise UserError("--imsize, --batch_size_per_gpu and --topk must be positive")
    if not args.use_cuda:
        args.device = "cpu"
    device, precision = init_eval(args)
    log = setup_logger()
    tb = TensorBoard(args.log_dir)
    database, queries, gnd = features_and_gnd(args, device, precision, log)
    results = None
    if dist.is_main_process():
        if args.dump_features:
            save_checkpoint({"database": database, "queries": queries, "gnd": gnd, "dataset": args.dataset},
                            Path(args.dump_features) / FEATURES_FILE)
            log.info(f"features saved to {args.dump_features}/{FEATURES_FILE}")
        results = evaluate(database, queries, gnd, args.topk, args.search)
        names = {"medium": "M", "hard": "H"}
        log.info(f">> {args.dataset}: mAP " + ", ".join(f"{names[s]}: {r['mAP']:.2f}" for s, r in results.items()))
        log.info(f">> {args.dataset}: mP@k{list(KAPPAS)} " + ", ".join(
            f"{names[s]}: [" + " ".join(f"{r[f'mP@{k}']:.2f}" for k in KAPPAS) + "]" for s, r in results.items()))
        if args.output_dir:
            write_json(Path(args.output_dir) / "retrieval.json", {"dataset": args.dataset, **results})
        tb.add(0, results)
    tb.close()
    dist.barrier()
    dist.cleanup()
    return results


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(get_args_parser(), "eval_image_retrieval")))
