"""Weighted k-NN classification on frozen features, the DINO protocol (Wu et al., 2018; Caron et al., 2021):
L2-normalised [CLS] features, the k most similar training images vote for their class with weight exp(sim / T).

    python eval_knn.py --pretrained_weights runs/dino/checkpoint.pth --data_path /path/to/imagenet
    torchrun --nproc_per_node 8 eval_knn.py --pretrained_weights dino_deitsmall16_pretrain.pth --data_path ...
"""
import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from core import distributed as dist
from core.augment import eval_transform
from core.config import parse_args
from core.errors import UserError, run_cli
from core.features import (add_eval_args, build_backbone, extract_features, init_eval, labelled_datasets,
                           load_features, save_features)
from core.log import setup_logger

BACKENDS = ("auto", "torch", "faiss")
QUERY_CHUNK = 1024
PROBE_QUERIES = 256
SIMILARITY_ELEMENTS = 1 << 25  # one similarity block holds at most this many entries (128 MiB in fp32)


def get_args_parser():
    p = argparse.ArgumentParser("k-NN evaluation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, type=str, help="Named configuration (section eval_knn of configs.yml).")
    add_eval_args(p)
    p.add_argument("--nb_knn", default=[10, 20, 100, 200], nargs="+", type=int,
                   help="Numbers of nearest neighbours to evaluate (20 is usually best).")
    p.add_argument("--temperature", default=0.07, type=float, help="Temperature of the exp(sim / T) vote weights.")
    p.add_argument("--knn_backend", default="auto", choices=BACKENDS,
                   help="Nearest-neighbour search: auto times faiss against torch on a probe (CPU), keeps the faster.")
    p.add_argument("--output_dir", default=None, type=str, help="Folder where knn.json with the accuracies goes.")
    return p


def faiss_installed():
    return importlib.util.find_spec("faiss") is not None


def choose_backend(backend, train, queries, k):
    """auto: on CPU with faiss installed, whichever of faiss and torch searches a probe of the queries faster on
    this machine (it depends on cores and BLAS: on 2 cores torch wins); otherwise torch."""
    if backend != "auto":
        return backend
    if train.device.type != "cpu" or not faiss_installed():
        return "torch"
    probe, seconds = queries[:PROBE_QUERIES], {}
    for name, search in (("torch", lambda: torch_topk(train, probe, k)),
                         ("faiss", lambda: faiss_topk(faiss_index(train), probe, k))):
        start = time.perf_counter()
        search()
        seconds[name] = time.perf_counter() - start
    return min(seconds, key=seconds.get)


def torch_topk(train, queries, k):
    """Exact top-k by inner product, the training set taken in blocks so the similarity matrix stays bounded;
    each block's top-k is merged into the running top-k."""
    block = max(k, SIMILARITY_ELEMENTS // max(len(queries), 1))
    best_sim = best_idx = None
    for start in range(0, len(train), block):
        sim, idx = (queries @ train[start:start + block].T).topk(min(k, len(train) - start), dim=1)
        idx += start
        if best_sim is not None:
            sim, order = torch.cat((best_sim, sim), dim=1).topk(k, dim=1)
            idx = torch.cat((best_idx, idx), dim=1).gather(1, order)
        best_sim, best_idx = sim, idx
    return best_sim, best_idx


def faiss_index(train):
    import faiss

    index = faiss.IndexFlatIP(train.shape[1])
    index.add(train.float().cpu().contiguous().numpy())
    return index


def faiss_topk(index, queries, k):
    sim, idx = index.search(queries.float().cpu().contiguous().numpy(), k)
    return torch.from_numpy(sim), torch.from_numpy(idx).long()


def vote(sim, neighbour_labels, num_classes, temperature):
    """Class scores: the sum of exp(sim / T) over the neighbours of each class."""
    scores = torch.zeros(len(sim), num_classes, dtype=sim.dtype, device=sim.device)
    return scores.scatter_add_(1, neighbour_labels, (sim / temperature).exp())


def check_knn_inputs(train_features, train_labels, test_features, test_labels, ks, num_classes=None):
    """The number of classes (from the labels when not given), after checking the inputs make sense."""
    if len(train_features) == 0 or len(test_features) == 0:
        raise UserError("k-NN needs at least one training and one test image: check the data folders")
    if max(ks) > len(train_features) or min(ks) < 1:
        raise UserError(f"--nb_knn {' '.join(map(str, ks))} must lie between 1 and the {len(train_features)} "
                        f"training images: lower k or add training images")
    labels = torch.cat((train_labels, test_labels))
    num_classes = num_classes or int(labels.max()) + 1
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"labels must lie in 0..{num_classes - 1}: check the features' labels")
    return num_classes


@torch.no_grad()
def knn_classify(train_features, train_labels, test_features, test_labels, ks=(10, 20, 100, 200),
                 temperature=0.07, num_classes=None, backend="auto"):
    """{k: (top-1 %, top-5 % or None)}. Features are L2-normalised here; neighbours are found once for the largest
    k and the first k of them vote for each k (they come sorted). Top-5 only when k >= 5 and there are more than 5
    classes. Ties between class scores go to the lower class index."""
    ks = sorted(set(ks))
    num_classes = check_knn_inputs(train_features, train_labels, test_features, test_labels, ks, num_classes)
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    train_labels, test_labels = train_labels.to(train.device), test_labels.to(train.device)
    backend = choose_backend(backend, train, test, ks[-1])
    setup_logger().info(f"nearest neighbours of {len(test)} queries among {len(train)} by {backend}")
    index = faiss_index(train) if backend == "faiss" else None
    correct = {k: torch.zeros(2, dtype=torch.long) for k in ks}
    for queries, targets in zip(test.split(QUERY_CHUNK), test_labels.split(QUERY_CHUNK)):
        if index is not None:
            sim, idx = faiss_topk(index, queries, ks[-1])
            sim, idx = sim.to(train.device), idx.to(train.device)
        else:
            sim, idx = torch_topk(train, queries, ks[-1])
        neighbour_labels = train_labels[idx]
        for k in ks:
            scores = vote(sim[:, :k], neighbour_labels[:, :k], num_classes, temperature)
            top5 = scores.sort(dim=1, descending=True, stable=True).indices[:, :5]
            hits = top5 == targets[:, None]
            correct[k] += torch.stack((hits[:, 0].sum(), hits.any(dim=1).sum())).cpu()
    n = len(test)
    return {k: (100.0 * c[0].item() / n, 100.0 * c[1].item() / n if k >= 5 and num_classes > 5 else None)
            for k, c in correct.items()}


def features_for_knn(args, device, precision, log):
    """(train_features, test_features, train_labels, test_labels, num_classes), from a dump or the backbone."""
    if args.load_features:
        train_features, test_features, train_labels, test_labels = load_features(args.load_features)
        log.info(f"loaded features from {args.load_features}")
        return train_features, test_features, train_labels, test_labels, None
    model, description = build_backbone(args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size,
                                        img_size=args.crop)
    if args.pretrained_weights:
        log.info(f"backbone: {description}")
    else:
        log.warning(f"WARNING: no --pretrained_weights: evaluating a {description} backbone (a random baseline)")
    model.to(device)
    transform = eval_transform(args.resize, args.crop)
    train, val = labelled_datasets(args.data_path, transform, transform)
    log.info(f"data: {len(train)} train and {len(val)} val images, {len(train.classes)} classes; "
             f"{dist.get_world_size()} process(es) on {device}")
    train_features, train_labels = extract_features(model, train, device, precision, args.batch_size_per_gpu,
                                                    args.num_workers)
    test_features, test_labels = extract_features(model, val, device, precision, args.batch_size_per_gpu,
                                                  args.num_workers)
    return train_features, test_features, train_labels, test_labels, len(train.classes)


def write_results(path, results):
    record = {str(k): {"top1": top1, "top5": top5} for k, (top1, top5) in results.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror}): choose a writable --output_dir") from e


def main(args):
    if args.knn_backend == "faiss" and not faiss_installed():
        raise UserError("--knn_backend faiss needs the faiss-cpu package: install it or use --knn_backend torch")
    device, precision = init_eval(args)
    log = setup_logger()
    train_features, test_features, train_labels, test_labels, num_classes = features_for_knn(args, device,
                                                                                             precision, log)
    train_features = F.normalize(train_features, dim=1)
    test_features = F.normalize(test_features, dim=1)
    # Every process checks, so that none waits forever for a main process that stopped on bad input.
    num_classes = check_knn_inputs(train_features, train_labels, test_features, test_labels, args.nb_knn,
                                   num_classes)
    results = None
    if dist.is_main_process():
        if args.dump_features:
            save_features(args.dump_features, train_features, test_features, train_labels, test_labels)
            log.info(f"features saved to {args.dump_features}")
        knn_device = device if device.type == "cuda" else torch.device("cpu")
        results = knn_classify(train_features.to(knn_device), train_labels, test_features.to(knn_device),
                               test_labels, args.nb_knn, args.temperature, num_classes, args.knn_backend)
        for k, (top1, top5) in results.items():
            log.info(f"{k}-NN classifier result: Top1: {top1:.2f}" + (f", Top5: {top5:.2f}" if top5 is not None
                                                                      else ""))
        if args.output_dir:
            write_results(Path(args.output_dir) / "knn.json", results)
    dist.barrier()
    dist.cleanup()
    return results


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(get_args_parser(), "eval_knn")))
