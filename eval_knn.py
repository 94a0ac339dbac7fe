"""Weighted k-NN classification on frozen features, the DINO protocol (Wu et al., 2018; Caron et al., 2021):
L2-normalised [CLS] features, the k most similar training images vote for their class with weight exp(sim / T).

    python eval_knn.py --pretrained_weights runs/dino/checkpoint.pth --data_path /path/to/imagenet
    torchrun --nproc_per_node 8 eval_knn.py --pretrained_weights dino_deitsmall16_pretrain.pth --data_path ...
"""
import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from core import distributed as dist
from core.augment import eval_transform
from core.config import add_launcher_args, bool_flag, parse_args
from core.errors import UserError, run_cli
from core.features import (add_eval_args, build_backbone, extract_features, init_eval, labelled_datasets,
                           load_features, save_features)
from core.knn import BACKENDS, check_knn_inputs, faiss_installed, knn_classify
from core.log import TensorBoard, setup_logger


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
    p.add_argument("--use_cuda", default=True, type=bool_flag,
                   help="Run the k-NN search with the features on the GPU (false: on the CPU, if the GPU runs out "
                        "of memory). Without a CUDA device it is always the CPU, whatever this says.")
    p.add_argument("--output_dir", default=None, type=str, help="Folder where knn.json with the accuracies goes.")
    p.add_argument("--log_dir", default=None, type=str,
                   help="Also write the accuracies as TensorBoard scalars knn_top1 and knn_top5 against k here "
                        "(needs the tensorboard package).")
    add_launcher_args(p)
    return p


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
    tb = TensorBoard(args.log_dir)
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
        knn_device = device if device.type == "cuda" and args.use_cuda else torch.device("cpu")
        results = knn_classify(train_features.to(knn_device), train_labels, test_features.to(knn_device),
                               test_labels, args.nb_knn, args.temperature, num_classes, args.knn_backend)
        for k, (top1, top5) in results.items():
            log.info(f"{k}-NN classifier result: Top1: {top1:.2f}" + (f", Top5: {top5:.2f}" if top5 is not None
                                                                      else ""))
            tb.add(k, {"knn_top1": top1, "knn_top5": top5})
        if args.output_dir:
            write_results(Path(args.output_dir) / "knn.json", results)
    tb.close()
    dist.barrier()
    dist.cleanup()
    return results


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(get_args_parser(), "eval_knn")))
