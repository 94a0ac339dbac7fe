import json
import math
import pickle
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

import eval_image_retrieval
from conftest import one_line_error, read_scalars
from core.config import parse_args
from core.knn import faiss_installed
from core.retrieval import apply_whitening, compute_map, gem, learn_whitening, protocol_gnd, search, trapezoid_ap
from core.vision_transformer import build_vit


def reference_map(rows, gnd, kappas=(1, 5, 10)):
    """Brute force, written apart from compute_map: drop the junk from each ranking, walk it counting hits, add one
    trapezoid (precision before and after the hit, times 1/n_positives) per hit."""
    aps, prs = [], []
    for row, g in zip(rows, gnd):
        ok, junk = set(g["ok"]), set(g["junk"])
        if not ok:
            continue
        kept = [x for x in row if x not in junk]
        hits, ap, hit_ranks = 0, 0.0, []
        for r, x in enumerate(kept):
            if x in ok:
                before = hits / r if r else 1.0
                hits += 1
                ap += (before + hits / (r + 1)) / 2 / len(ok)
                hit_ranks.append(r + 1)
        aps.append(ap)
        last = hit_ranks[-1]
        prs.append([sum(h <= min(k, last) for h in hit_ranks) / min(k, last) for k in kappas])
    return float(np.mean(aps)), np.mean(prs, axis=0)


def test_trapezoid_ap_by_hand():
    """Positives at 0-based ranks 0 and 2 of 3: (1 + 1)/2 * 1/3 + (1/2 + 2/3)/2 * 1/3 = 1/3 + 7/36 = 19/36."""
    assert trapezoid_ap([0, 2], 3) == pytest.approx(19 / 36, abs=1e-12)
    assert trapezoid_ap([], 3) == 0.0


def test_compute_map_hand_worked_easy_hard_junk():
    """Query 0: easy {2, 5}, hard {7}, junk {1, 8}; ranking 1 2 3 7 8 0 5 4 6 9.
    Medium (positives 2, 5, 7; junk 1, 8 removed): 2 3 7 0 5 4 6 9, positives at 0-based ranks 0, 2, 4:
      AP = [(1 + 1)/2 + (1/2 + 2/3)/2 + (2/4 + 3/5)/2] / 3 = 1/3 + 7/36 + 11/60 = 32/45;
      1-based ranks 1, 3, 5 (last 5): P@1 = 1, P@5 = 3/5, P@10 = 3/min(10, 5) = 3/5.
    Hard (positive 7; junk 1, 8, 2, 5 removed): 3 7 0 4 6 9, positive at rank 1: AP = (0/1 + 1/2)/2 = 1/4;
      last = 2: P@1 = 0, P@5 = P@10 = 1/2.
    Query 1: easy {0}, nothing hard, ranked first: Medium AP 1, P@k 1; no Hard positive, so left out of Hard."""
    gnd = [{"easy": [2, 5], "hard": [7], "junk": [1, 8]}, {"easy": [0], "hard": [], "junk": []}]
    ranks = np.array([[1, 2, 3, 7, 8, 0, 5, 4, 6, 9], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    mean_ap, aps, mean_pr, prs = compute_map(ranks, protocol_gnd(gnd, "medium"))
    assert aps == pytest.approx([32 / 45, 1.0])
    assert mean_ap == pytest.approx((32 / 45 + 1) / 2)
    np.testing.assert_allclose(prs, [[1, 3 / 5, 3 / 5], [1, 1, 1]])
    assert mean_pr == pytest.approx([1, 4 / 5, 4 / 5])
    mean_ap, aps, mean_pr, _ = compute_map(ranks, protocol_gnd(gnd, "hard"))
    assert mean_ap == pytest.approx(1 / 4) and math.isnan(aps[1])
    assert mean_pr == pytest.approx([0, 1 / 2, 1 / 2])


def test_truncated_ranking_counts_missing_positives_as_not_retrieved():
    """Positives 0 and 9, top-3 ranking 0 4 5: only rank 0 is found, AP = (1 + 1)/2 * 1/2 = 1/2."""
    mean_ap, _, _, _ = compute_map(np.array([[0, 4, 5]]), [{"ok": [0, 9], "junk": []}])
    assert mean_ap == pytest.approx(0.5)


@pytest.mark.parametrize("dataset", ["roxford5k", "rparis6k"])
def test_map_on_real_ground_truth(shared_data, dataset):
    with open(shared_data / "revisitop" / f"gnd_{dataset}.pkl", "rb") as f:
        cfg = pickle.load(f)
    n, gnd = len(cfg["imlist"]), cfg["gnd"]
    perfect = []
    for g in gnd:
        first = list(g["easy"]) + list(g["hard"])
        seen = set(first)
        perfect.append(first + [i for i in range(n) if i not in seen])
    perfect = np.array(perfect)
    for setup in ("medium", "hard"):
        mean_ap, _, mean_pr, _ = compute_map(perfect, protocol_gnd(gnd, setup))
        assert mean_ap == pytest.approx(1.0) and mean_pr == pytest.approx([1.0, 1.0, 1.0])
    rng = np.random.default_rng(0)
    shuffled = np.stack([rng.permutation(n) for _ in gnd])
    for rows in (perfect[:, ::-1], shuffled):
        for setup in ("medium", "hard"):
            mean_ap, _, mean_pr, _ = compute_map(rows, protocol_gnd(gnd, setup))
            ref_ap, ref_pr = reference_map(rows.tolist(), protocol_gnd(gnd, setup))
            assert mean_ap == pytest.approx(ref_ap, abs=1e-12) and mean_pr == pytest.approx(ref_pr, abs=1e-12)
            assert mean_ap < 0.2


def test_gem_against_direct_formula():
    x = torch.randn(2, 5, 3)
    got = gem(x, p=4)
    for b in range(2):
        for d in range(3):
            values = [max(float(x[b, t, d]), 1e-6) ** 4 for t in range(5)]
            assert float(got[b, d]) == pytest.approx((sum(values) / 5) ** 0.25, rel=1e-5)
    positive = x.abs() + 0.1
    torch.testing.assert_close(gem(positive, p=1), positive.mean(dim=1))


def test_whitening_against_direct_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 6)) @ rng.normal(size=(6, 6)) + 3.0  # correlated and not centred
    y = rng.normal(size=(4, 6)) + 3.0
    mean, projection = learn_whitening(torch.tensor(x))
    eigenvalues, eigenvectors = np.linalg.eigh(x.T @ x / len(x))
    order = np.argsort(-eigenvalues)
    p = np.diag(eigenvalues[order] ** -0.5) @ eigenvectors[:, order].T
    np.testing.assert_allclose(mean.numpy(), x.mean(axis=0))
    # Eigenvector signs are arbitrary: compare what they leave unchanged, P^T P and the inner products.
    np.testing.assert_allclose(projection.numpy().T @ projection.numpy(), p.T @ p, rtol=1e-8)
    whitened = apply_whitening(torch.tensor(y), mean, projection).double().numpy()
    expected = (y - x.mean(axis=0)) @ p.T
    np.testing.assert_allclose(whitened @ whitened.T, expected @ expected.T, rtol=1e-5)
    centred = x - x.mean(axis=0)  # of centred data the second moment is the covariance: whitened, the identity
    mean0, projection0 = learn_whitening(torch.tensor(centred))
    w = apply_whitening(torch.tensor(centred), mean0, projection0).double().numpy()
    np.testing.assert_allclose(w.T @ w / len(w), np.eye(6), atol=1e-4)


def test_whitening_floors_small_eigenvalues():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 2)) @ rng.normal(size=(2, 5))  # rank 2 in 5 dimensions
    _, projection = learn_whitening(torch.tensor(x))
    largest = np.linalg.eigvalsh(x.T @ x / len(x)).max()
    singular = np.sort(np.linalg.svd(projection.numpy(), compute_uv=False))
    np.testing.assert_allclose(singular[-3:], (largest * 1e-5) ** -0.5, rtol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_search_is_exact(backend, monkeypatch):
    if backend == "faiss" and not faiss_installed():
        pytest.skip("faiss is not installed")
    monkeypatch.setattr("core.knn.SIMILARITY_ELEMENTS", 50)  # database blocks merged into a running top-k
    database, queries = F.normalize(torch.randn(40, 8), dim=1), F.normalize(torch.randn(7, 8), dim=1)
    sim, idx = search(database, queries, 10, backend)
    expected = np.argsort(-(queries @ database.T).numpy(), axis=1, kind="stable")[:, :10]
    assert idx.tolist() == expected.tolist()
    torch.testing.assert_close(sim, (queries @ database.T).gather(1, idx), atol=1e-5, rtol=0)


# ---- end to end ----

def write_image(path, size, seed):
    """A smooth random picture (blobs), so that features vary with the content."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(small).resize(size, Image.BICUBIC).save(path, quality=95)


SIZES = [(90, 70), (70, 90), (50, 40), (90, 70)]


def revisitop_set(root, name="mini"):
    """12 database images of mixed sizes and 3 queries, each a byte copy of database image 0, 4 or 8 (the easy
    positive), in revisitop's layout with a gnd pkl of our own."""
    folder = root / name / "jpg"
    folder.mkdir(parents=True)
    imlist = [f"db_{i:02d}" for i in range(12)]
    for i, stem in enumerate(imlist):
        write_image(folder / f"{stem}.jpg", SIZES[i % 4], i)
    qimlist = [f"query_{i}" for i in (0, 4, 8)]
    for i, stem in zip((0, 4, 8), qimlist):
        shutil.copy(folder / f"db_{i:02d}.jpg", folder / f"{stem}.jpg")
    gnd = [{"bbx": [5.0, 5.0, 45.0, 35.0], "easy": [i], "hard": [(i + 1) % 12, (i + 5) % 12], "junk": [(i + 2) % 12]}
           for i in (0, 4, 8)]
    with open(root / name / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)
    return folder, imlist, qimlist, gnd


def tiny_checkpoint(path):
    """A random vit_tiny/16 saved as DINO saves its teacher (backbone. prefix), to go through the loader."""
    torch.manual_seed(0)
    model = build_vit("vit_tiny", 16).eval()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, path)
    return model


@torch.no_grad()
def dino_way_features(model, paths, imsize, multiscale=False, boxes=None):
    """The original's extraction: one image at a time, PIL thumbnail, ToTensor + Normalize, the model's [CLS]
    (multi-scale: interpolate the single image, sum, /3, / its norm)."""
    transform = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    rows = []
    for path, box in zip(paths, boxes or [None] * len(paths)):
        image = Image.open(path).convert("RGB")
        if box is not None:
            image = image.crop(box)
        image.thumbnail((imsize, imsize), Image.LANCZOS)
        x = transform(image)[None]
        if multiscale:
            v = sum(model(x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False))
                    for s in (1, 1 / 2 ** 0.5, 1 / 2)) / 3
            rows.append(v / v.norm())
        else:
            rows.append(model(x))
    return torch.cat(rows)


def reference_scores(database, queries, gnd, setups=("medium", "hard")):
    sim = F.normalize(database, dim=1) @ F.normalize(queries, dim=1).T
    rows = torch.argsort(-sim, dim=0).T.tolist()
    out = {}
    for setup in setups:
        ap, pr = reference_map(rows, protocol_gnd(gnd, setup))
        out[setup] = {"mAP": 100 * ap, **{f"mP@{k}": 100 * p for k, p in zip((1, 5, 10), pr)}}
    return out


def run(argv):
    args = parse_args(eval_image_retrieval.get_args_parser(), "eval_image_retrieval", [str(a) for a in argv])
    return eval_image_retrieval.main(args)


@pytest.mark.parametrize("multiscale", [False, True])
def test_retrieval_end_to_end(tmp_path, multiscale):
    folder, imlist, qimlist, gnd = revisitop_set(tmp_path / "data")
    model = tiny_checkpoint(tmp_path / "ckpt.pth")
    common = ["--dataset", "mini", "--imsize", 64, "--num_workers", 0, "--multiscale", str(multiscale).lower(),
              "--use_cuda", "false", "--local-rank=0"]  # the original's flags, as torch.distributed.launch passes them
    results = run(["--data_path", tmp_path / "data", "--pretrained_weights", tmp_path / "ckpt.pth", *common,
                   "--batch_size_per_gpu", 3, "--output_dir", tmp_path / "out", "--dump_features", tmp_path / "f"])
    database = dino_way_features(model, [folder / f"{n}.jpg" for n in imlist], 64, multiscale)
    queries = dino_way_features(model, [folder / f"{n}.jpg" for n in qimlist], 64, multiscale)
    expected = reference_scores(database, queries, gnd)
    for setup in ("medium", "hard"):
        for key, value in expected[setup].items():
            assert results[setup][key] == pytest.approx(value, abs=1e-6), (setup, key)
    assert results["medium"]["mP@1"] == 100.0  # each query is a copy of its easy positive
    assert json.loads((tmp_path / "out" / "retrieval.json").read_text()) == {"dataset": "mini", **results}
    again = run(["--load_features", tmp_path / "f", "--data_path", tmp_path / "nowhere", *common])
    assert again == results


def test_retrieval_json_ground_truth_with_query_boxes(tmp_path):
    folder = tmp_path / "data" / "mine" / "jpg"
    folder.mkdir(parents=True)
    for i in range(6):
        write_image(folder / f"img{i}.png", SIZES[i % 4], 10 + i)
    write_image(folder / "q.jpg", (90, 70), 10)
    spec = {"queries": [{"image": "q.jpg", "positives": ["img0.png"], "junk": ["img1.png"], "bbx": [0, 0, 60, 50]},
                        {"image": "img5.png", "positives": ["img3.png"]}]}
    (tmp_path / "data" / "mine" / "gnd_mine.json").write_text(json.dumps(spec))
    model = tiny_checkpoint(tmp_path / "ckpt.pth")
    results = run(["--data_path", tmp_path / "data", "--dataset", "mine", "--pretrained_weights", tmp_path / "ckpt.pth",
                   "--imsize", 64, "--num_workers", 0, "--query_bbx", "true", "--log_dir", tmp_path / "tb"])
    database = [folder / f"img{i}.png" for i in range(5)]  # every image but the queries
    gnd = [{"easy": [0], "hard": [], "junk": [1]}, {"easy": [3], "hard": [], "junk": []}]  # img5 is not in it
    db = dino_way_features(model, database, 64)
    q = dino_way_features(model, [folder / "q.jpg", folder / "img5.png"], 64, boxes=[(0, 0, 60, 50), None])
    expected = reference_scores(db, q, gnd, ("medium",))["medium"]
    assert set(results) == {"medium"}
    assert results["medium"] == pytest.approx(expected, abs=1e-6)
    logged = read_scalars(tmp_path / "tb")
    assert set(logged) == {f"medium/{k}" for k in expected}
    assert all(logged[f"medium/{k}"] == [(0, pytest.approx(v, abs=1e-4))] for k, v in expected.items())


def test_original_flags_and_defaults():
    args = parse_args(eval_image_retrieval.get_args_parser(), "eval_image_retrieval", [])
    assert {k: getattr(args, k) for k in ("data_path", "dataset", "multiscale", "imsize", "pretrained_weights",
                                          "use_cuda", "checkpoint_key", "num_workers", "dist_url", "local_rank")} == {
        "data_path": "/path/to/revisited_paris_oxford/", "dataset": "roxford5k", "multiscale": False, "imsize": 224,
        "pretrained_weights": "", "use_cuda": True, "checkpoint_key": "teacher", "num_workers": 10,
        "dist_url": "env://", "local_rank": 0}


def cli_error(argv, capsys):
    return one_line_error(lambda: run(argv), capsys)


def test_retrieval_bad_input(tmp_path, capsys):
    common = ["--dataset", "mini", "--imsize", 64, "--num_workers", 0, "--arch", "vit_tiny"]
    message = cli_error(["--data_path", tmp_path / "data", *common], capsys)
    assert f"ground truth {tmp_path / 'data' / 'mini' / 'gnd_mini.pkl'} not found" in message
    folder, imlist, _, _ = revisitop_set(tmp_path / "data")
    (folder / f"{imlist[3]}.jpg").unlink()
    (folder / f"{imlist[7]}.jpg").unlink()
    message = cli_error(["--data_path", tmp_path / "data", *common], capsys)
    assert f"image {folder / imlist[3]}.jpg listed in the ground truth is missing (2 missing in all)" in message
    (folder / f"{imlist[3]}.jpg").write_bytes(b"not a jpeg")
    shutil.copy(folder / f"{imlist[0]}.jpg", folder / f"{imlist[7]}.jpg")
    assert f"cannot decode image {folder / imlist[3]}.jpg" in cli_error(["--data_path", tmp_path / "data", *common],
                                                                         capsys)
    (tmp_path / "data" / "mini" / "gnd_mini.pkl").write_bytes(pickle.dumps(shutil.rmtree))
    assert "is not allowed in a ground-truth file" in cli_error(["--data_path", tmp_path / "data", *common], capsys)
    (tmp_path / "data" / "mini" / "gnd_mini.pkl").unlink()
    (tmp_path / "data" / "mini" / "gnd_mini.json").write_text(json.dumps(
        {"queries": [{"image": "query_0.jpg", "positives": ["nope.jpg"]}]}))
    assert "lists nope.jpg, which is not in the database" in cli_error(["--data_path", tmp_path / "data", *common],
                                                                        capsys)
