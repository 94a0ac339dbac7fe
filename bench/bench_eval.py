"""Evaluation speed: feature extraction images/s and k-NN search time, ours against a naive baseline, same run.

Random tensors stand in for data, so this times the model and the search, not image decoding. Paths:
  extraction  ours: SDPA attention under autocast at --precision (fp32 on CPU), the last block computing [CLS]
              alone, inference mode;
              baseline: the same backbone in fp32 with the original's forward (explicit softmax attention, every
              token through every block).
  k-NN        ours: core.knn.knn_classify, neighbours found once for the largest k, by chunked torch matmul +
              top-k with a bounded similarity block, or by faiss (CPU; --knn_backend auto keeps the faster of the
              two), then scatter-add voting;
              baseline: the original's structure, one full dense similarity matrix and top-k per k, one-hot voting.
Both k-NN paths must give the same accuracies; the script checks it.

    python bench/bench_eval.py                                     # CPU-sized defaults, tens of seconds
    python bench/bench_eval.py --batch_size 256 --n_train 200000 --n_test 10000 --num_classes 1000    # one GPU
"""
import argparse
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.bench_dino import original_forward  # noqa: E402
from core.device import autocast, resolve_device, resolve_precision, synchronize  # noqa: E402
from core.errors import run_cli  # noqa: E402
from core.knn import faiss_installed, knn_classify  # noqa: E402
from core.vision_transformer import build_vit  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser("bench_eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_small", type=str)
    p.add_argument("--patch_size", default=16, type=int)
    p.add_argument("--img_size", default=224, type=int)
    p.add_argument("--batch_size", default=16, type=int)
    p.add_argument("--steps", default=3, type=int, help="Timed extraction batches.")
    p.add_argument("--warmup", default=1, type=int, help="Untimed batches first.")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="Our extraction path's precision (auto: bf16 on CUDA, fp32 on CPU); the baseline is fp32.")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--n_train", default=20000, type=int, help="Training features searched by k-NN.")
    p.add_argument("--n_test", default=2000, type=int, help="Query features.")
    p.add_argument("--dim", default=384, type=int, help="Feature dimension.")
    p.add_argument("--num_classes", default=100, type=int)
    p.add_argument("--nb_knn", default=[10, 20, 100, 200], nargs="+", type=int)
    return p


@torch.inference_mode()
def extraction_images_per_s(args, device, fused_attn, precision):
    torch.manual_seed(0)
    model = build_vit(args.arch, args.patch_size, img_size=args.img_size).to(device).eval()
    model.fused_attn = fused_attn
    forward = model if fused_attn else functools.partial(original_forward, model)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    for _ in range(args.warmup):
        with autocast(device, precision):
            forward(images)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        with autocast(device, precision):
            forward(images)
    synchronize(device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


@torch.no_grad()
def naive_knn(train, train_labels, test, test_labels, ks, temperature, num_classes):
    """The original's structure without its chunking: for each k, top-k over the full similarity matrix and a
    one-hot (queries x k x classes) vote."""
    results = {}
    similarity = test @ train.T
    for k in ks:
        sim, idx = similarity.topk(k, dim=1)
        one_hot = torch.zeros(len(test) * k, num_classes, device=train.device)
        one_hot.scatter_(1, train_labels[idx].view(-1, 1), 1)
        probs = (one_hot.view(len(test), k, num_classes) * (sim / temperature).exp()[..., None]).sum(1)
        top5 = probs.sort(dim=1, descending=True, stable=True).indices[:, :5] == test_labels[:, None]
        results[k] = (100.0 * top5[:, 0].sum().item() / len(test),
                      100.0 * top5.any(dim=1).sum().item() / len(test) if k >= 5 and num_classes > 5 else None)
    return results


def timed(device, fn):
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def clustered_features(args, device):
    """Features with class structure, so that the accuracies compared below are not all chance."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(args.num_classes, args.dim, generator=g)
    train_labels = torch.randint(0, args.num_classes, (args.n_train,), generator=g)
    test_labels = torch.randint(0, args.num_classes, (args.n_test,), generator=g)
    train = centers[train_labels] + 4 * torch.randn(args.n_train, args.dim, generator=g)
    test = centers[test_labels] + 4 * torch.randn(args.n_test, args.dim, generator=g)
    return (F.normalize(train, dim=1).to(device), train_labels.to(device), F.normalize(test, dim=1).to(device),
            test_labels.to(device))


def main(args):
    device = resolve_device(args.device)
    precision = resolve_precision(device, args.precision)
    ours = extraction_images_per_s(args, device, True, precision)
    base = extraction_images_per_s(args, device, False, "fp32")
    print(f"feature extraction, {args.arch}/{args.patch_size} at {args.img_size} px, batch {args.batch_size}, "
          f"{device}:")
    print(f"  ours (SDPA, {precision}) {ours:9.1f} img/s | baseline (explicit attention, fp32) {base:9.1f} img/s | "
          f"ratio {ours / base:.2f}x")

    train, train_labels, test, test_labels = clustered_features(args, device)
    knn_args = (train, train_labels, test, test_labels, args.nb_knn, 0.07, args.num_classes)
    print(f"k-NN, {args.n_train} train x {args.n_test} test features of dim {args.dim}, {args.num_classes} "
          f"classes, k in {args.nb_knn}:")
    baseline, base_s = timed(device, lambda: naive_knn(*knn_args))
    backends = ["torch"] + (["faiss"] if device.type == "cpu" and faiss_installed() else [])
    k = args.nb_knn[0]
    for backend in backends:
        result, seconds = timed(device, lambda: knn_classify(*knn_args, backend=backend))
        same = all(abs(result[k][0] - baseline[k][0]) < 0.2 for k in result)  # equal up to similarity ties
        print(f"  ours ({backend}) {seconds:8.3f} s | baseline (dense, per-k top-k, one-hot) {base_s:8.3f} s | "
              f"ratio {base_s / seconds:.2f}x | same accuracies: {same} ({k}-NN top-1 {result[k][0]:.2f})")

if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
