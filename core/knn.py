"""Weighted k-NN classification on frozen features, the DINO protocol (Wu et al., 2018; Caron et al., 2021):
L2-normalised features, the k most similar training images vote for their class with weight exp(sim / T).

One classifier for eval_knn.py and for the k-NN monitor of the pretraining scripts, so that the monitor's number is
the one eval_knn.py gives on the saved checkpoint.
"""
import importlib.util
import time

import torch
import torch.nn.functional as F

from core.augment import eval_resize, eval_transform
from core.errors import UserError
from core.features import extract_features, labelled_datasets
from core.log import setup_logger

BACKENDS = ("auto", "torch", "faiss")
QUERY_CHUNK = 1024
PROBE_QUERIES = 256
SIMILARITY_ELEMENTS = 1 << 25  # one similarity block holds at most this many entries (128 MiB in fp32)
MONITOR_K, MONITOR_T = 20, 0.07  # DINO's reported k-NN setting
MONITOR_SUBSET_SEED = 0  # not the run's --seed: runs with different seeds are monitored on the same images


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


def add_monitor_args(parser):
    """The k-NN monitor's flags, shared by the pretraining scripts."""
    parser.add_argument("--knn_every", default=0, type=int,
                        help=f"Every this many epochs (and at the last), the {MONITOR_K}-NN top-1 (T = {MONITOR_T}) "
                             f"of the backbone on --knn_data_path, logged as knn_top1; 0 disables.")
    parser.add_argument("--knn_data_path", default=None, type=str,
                        help="Folder with train/ and val/ ImageFolder trees for the k-NN monitor; default when "
                             "training on the embedded data: its own train/val split.")
    parser.add_argument("--knn_max_train", default=10000, type=int,
                        help="The k-NN monitor uses at most this many training images (a fixed seeded subset).")
    return parser


def build_knn_monitor(args, crop, batch_size):
    """The monitor for `args`, or None when --knn_every is 0; flags and data are checked here, at start-up."""
    if args.knn_every < 0:
        raise UserError(f"--knn_every must be 0 (off) or a number of epochs, got {args.knn_every}")
    if args.knn_every == 0:
        return None
    if args.knn_data_path is None and args.data_path is not None:
        raise UserError("--knn_every needs --knn_data_path (a folder with train/ and val/ ImageFolder trees) when "
                        "training on your own images: give one or set --knn_every 0")
    return KNNMonitor(args.knn_data_path, crop, args.knn_every, args.epochs, args.knn_max_train, batch_size,
                      args.num_workers)


class KNNMonitor:
    """The k-NN top-1 of a backbone during pretraining, computed as eval_knn.py computes it at the same resize and
    crop (eval_resize(crop), then crop) on at most `max_train` training images and the whole val split.

    A run is the same with and without it: the model's train/eval mode and torch's random state are restored (the
    evaluation transform draws nothing from numpy or random), and it has its own datasets and loaders, so the
    training loader's order and augmentations are untouched.
    """

    def __init__(self, data_path, crop, every, epochs, max_train=10000, batch_size=128, num_workers=10):
        if max_train < MONITOR_K:
            raise UserError(f"--knn_max_train must be at least k = {MONITOR_K}, got {max_train}")
        transform = eval_transform(eval_resize(crop), crop)
        self.train, self.val = labelled_datasets(data_path, transform, transform)
        if len(self.train) > max_train:
            generator = torch.Generator().manual_seed(MONITOR_SUBSET_SEED)
            keep = torch.randperm(len(self.train), generator=generator)[:max_train].sort().values.tolist()
            self.train.samples = [self.train.samples[i] for i in keep]
            self.train.targets = [t for _, t in self.train.samples]
        if len(self.train) < MONITOR_K:
            raise UserError(f"the k-NN monitor needs at least {MONITOR_K} training images, {self.train.root} has "
                            f"{len(self.train)}: add images")
        self.every, self.epochs, self.batch_size, self.num_workers = every, epochs, batch_size, num_workers

    def due(self, epoch):
        return (epoch + 1) % self.every == 0 or epoch + 1 == self.epochs

    def __call__(self, model, device, precision, embed=None):
        """Top-1 (%) of `embed` (default: the model itself) on every process, each extracting its shard."""
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                train_features, train_labels = extract_features(embed or model, self.train, device, precision,
                                                                self.batch_size, self.num_workers)
                test_features, test_labels = extract_features(embed or model, self.val, device, precision,
                                                              self.batch_size, self.num_workers)
        finally:
            model.train(was_training)
        knn_device = device if device.type == "cuda" else torch.device("cpu")
        top1 = knn_classify(train_features.to(knn_device), train_labels, test_features.to(knn_device), test_labels,
                            (MONITOR_K,), MONITOR_T, len(self.train.classes), "torch")[MONITOR_K][0]
        setup_logger().info(f"k-NN monitor: {MONITOR_K}-NN top-1 {top1:.2f}% on {len(self.val)} val images "
                            f"({time.perf_counter() - start:.1f} s)")
        return top1
