"""Image retrieval and copy detection scoring: revisitop's mAP and mP@k with junk images, the Medium and Hard
protocols of Revisited Oxford and Paris, the Holidays/Copydays trapezoidal AP, GeM pooling, DINO's whitening and the
nearest-neighbour search.

Numbers follow filipradenovic/revisitop (python/evaluate.py) and facebookresearch/dino (eval_image_retrieval.py,
eval_copy_detection.py); rankings are (queries, ranked database indices), the transpose of revisitop's array.
"""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from core.augment import BICUBIC, to_normalized
from core.errors import UserError
from core.knn import faiss_index, faiss_installed, faiss_topk, torch_topk

# revisitop's protocols: which annotated images count as positives and which are ignored (junk).
SETUPS = {"medium": (("easy", "hard"), ("junk",)), "hard": (("hard",), ("junk", "easy"))}
KAPPAS = (1, 5, 10)
MULTISCALES = (1, 1 / 2 ** 0.5, 1 / 2)
FAISS_MIN_DATABASE = 100_000  # below this, an exact torch search is as fast on CPU and needs no extra package


class Thumbnail:
    """PIL's thumbnail, as DINO's retrieval dataset: shrink (never enlarge) so the longer side is at most `imsize`,
    aspect kept, Lanczos (PIL's ANTIALIAS), in place on the freshly decoded image it is given. A class, not a lambda,
    so that data-loading workers can pickle it."""

    def __init__(self, imsize):
        self.imsize = imsize

    def __call__(self, image):
        image.thumbnail((self.imsize, self.imsize), Image.LANCZOS)
        return image


def retrieval_transform(imsize):
    return v2.Compose([Thumbnail(imsize), v2.ToImage()] + to_normalized())


def copy_detection_transform(imsize):
    """A square `imsize` x `imsize` bicubic resize done by PIL (Resize before ToImage), as DINO's copy detection."""
    return v2.Compose([v2.Resize((imsize, imsize), interpolation=BICUBIC), v2.ToImage()] + to_normalized())


def multiscale(embed, images, scales=MULTISCALES):
    """DINO's multi-scale descriptor: embeddings of the image bilinearly rescaled by 1, 1/sqrt(2) and 1/2,
    averaged, then L2-normalised (per image; the original normalises its single-image batch as a whole)."""
    total = 0
    for s in scales:
        x = images if s == 1 else F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)
        total = total + embed(x).float()
    return F.normalize(total / len(scales), dim=-1)


def gem(tokens, p=4.0, eps=1e-6):
    """Generalised mean pooling over the token axis (dim 1): mean(clamp(x, eps)^p)^(1/p), computed in fp32."""
    return tokens.float().clamp(min=eps).pow(p).mean(dim=1).pow(1.0 / p)


def copy_detection_descriptor(model, images):
    """DINO's copy-detection descriptor: the last block's normed [CLS] token concatenated with GeM (p=4) of its patch
    tokens (register tokens, if any, left out)."""
    if not hasattr(model, "get_intermediate_layers"):
        raise UserError("copy detection needs the patch tokens of one of our ViTs (a timm backbone gives only its "
                        "pooled output): use --arch vit_tiny/vit_small/vit_base/vit_large")
    tokens = model.get_intermediate_layers(images, 1)[0]
    return torch.cat((tokens[:, 0].float(), gem(tokens[:, 1 + model.num_register_tokens:])), dim=1)


def learn_whitening(features, power=0.5):
    """(mean, projection) learned as DINO's copy detection does: the mean of the whitening features, and the
    eigen-decomposition of their second-moment matrix X^T X / n (X not centred, as in the original), eigenvalues
    floored at 1e-5 of the largest, sorted in decreasing order, projection = diag(eigenvalue^-power) V^T.
    Computed in float64."""
    x = features.double()
    eigenvalues, eigenvectors = torch.linalg.eigh(x.T @ x / len(x))
    eigenvalues = eigenvalues.clamp(min=eigenvalues.max().item() * 1e-5)
    order = eigenvalues.argsort(descending=True)
    projection = eigenvalues[order].pow(-power)[:, None] * eigenvectors[:, order].T
    return x.mean(dim=0), projection


def apply_whitening(x, mean, projection):
    return ((x.double() - mean) @ projection.T).float()


def trapezoid_ap(ranks, n_positives):
    """Average precision from the sorted 0-based ranks of the retrieved positives, by the trapezoid rule of the
    Holidays evaluation package (revisitop's compute_ap and DINO's score_ap_from_ranks_1 are this same formula):
    each positive adds recall 1/n_positives times the mean of the precision just before and just after it."""
    ranks = np.asarray(ranks, dtype=np.float64)
    found = np.arange(len(ranks), dtype=np.float64)
    before = np.where(ranks == 0, 1.0, found / np.maximum(ranks, 1))
    after = (found + 1) / (ranks + 1)
    return float((before + after).sum() / (2.0 * n_positives))


def compute_map(ranks, gnd, kappas=KAPPAS):
    """revisitop's compute_map: (mAP, per-query AP, mean precision at kappas, per-query precision at kappas).

    ranks: (queries, depth) database indices, best first; gnd: one dict per query with 'ok' and 'junk' index lists.
    Junk images are removed from the ranking before scoring; queries without positives are excluded from the means
    (their entries are NaN). mP@k divides by min(k, rank of the last retrieved positive), as revisitop does. With a
    truncated ranking (depth < database) positives beyond it count as not retrieved.
    """
    ranks = np.asarray(ranks)
    aps = np.full(len(gnd), np.nan)
    prs = np.full((len(gnd), len(kappas)), np.nan)
    for i, g in enumerate(gnd):
        ok = np.asarray(g["ok"], dtype=np.int64)
        if len(ok) == 0:
            continue
        positions = np.flatnonzero(np.isin(ranks[i], ok))
        junk = np.flatnonzero(np.isin(ranks[i], np.asarray(g.get("junk", []), dtype=np.int64)))
        positions = positions - np.searchsorted(junk, positions)  # junk ranked above a positive does not count
        aps[i] = trapezoid_ap(positions, len(ok))
        if len(positions) == 0:
            prs[i] = 0.0
            continue
        last = positions.max() + 1
        prs[i] = [(positions + 1 <= min(last, k)).sum() / min(last, k) for k in kappas]
    valid = ~np.isnan(aps)
    if not valid.any():
        return float("nan"), aps, np.full(len(kappas), np.nan), prs
    return float(aps[valid].mean()), aps, prs[valid].mean(axis=0), prs


def protocol_gnd(gnd, setup):
    """The ground truth of a revisitop protocol: 'medium' (positives easy+hard, junk ignored) or 'hard' (positives
    hard, junk and easy ignored)."""
    positives, ignored = SETUPS[setup]
    return [{"ok": [i for key in positives for i in g.get(key, [])],
             "junk": [i for key in ignored for i in g.get(key, [])]} for g in gnd]


def search(database, queries, k, backend="auto"):
    """(similarities, indices), each (queries, k): the k database rows of largest inner product, best first, exact.
    auto: faiss for databases of FAISS_MIN_DATABASE rows and more on the CPU when installed, else torch."""
    k = min(k, len(database))
    if backend == "auto":
        large = len(database) >= FAISS_MIN_DATABASE and database.device.type == "cpu"
        backend = "faiss" if large and faiss_installed() else "torch"
    if backend == "faiss":
        if not faiss_installed():
            raise UserError("--search faiss needs the faiss-cpu package: install it or use --search torch")
        return faiss_topk(faiss_index(database), queries, k)
    return torch_topk(database, queries, k)
