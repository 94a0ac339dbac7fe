import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import eval_knn
from core import knn
from core.config import parse_args
from core.errors import UserError, run_cli
from core.features import save_features
from core.knn import knn_classify


def brute_force_knn(train, train_labels, test, test_labels, k, T, num_classes):
    """Independent reference in float64 numpy, one query at a time: sort all similarities, weight the k best by
    exp(sim / T), rank classes by (-score, class index)."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    top1 = top5 = 0
    for q, y in zip(test, test_labels):
        sims = train @ q
        nearest = np.argsort(-sims, kind="stable")[:k]
        scores = np.zeros(num_classes)
        for i in nearest:
            scores[train_labels[i]] += math.exp(sims[i] / T)
        ranking = sorted(range(num_classes), key=lambda c: (-scores[c], c))
        top1 += ranking[0] == y
        top5 += y in ranking[:5]
    n = len(test)
    return 100.0 * top1 / n, 100.0 * top5 / n


@pytest.mark.parametrize("backend", ["torch", "faiss", "auto"])
def test_knn_matches_brute_force(backend, monkeypatch):
    rng = np.random.default_rng(0)
    num_classes, dim = 12, 16
    centers = rng.normal(size=(num_classes, dim))
    train_labels = rng.integers(0, num_classes, 300)
    test_labels = rng.integers(0, num_classes, 37)  # under 100 test images: the original crashed here
    train = centers[train_labels] + 1.5 * rng.normal(size=(300, dim))
    test = centers[test_labels] + 1.5 * rng.normal(size=(37, dim))
    ks = (1, 3, 10, 20, 300)
    monkeypatch.setattr(knn, "QUERY_CHUNK", 8)  # several query chunks ...
    monkeypatch.setattr(knn, "SIMILARITY_ELEMENTS", 8 * 50)  # ... and train blocks merged into a running top-k
    got = knn_classify(torch.tensor(train, dtype=torch.float32), torch.tensor(train_labels),
                       torch.tensor(test, dtype=torch.float32), torch.tensor(test_labels), ks, 0.07, num_classes,
                       backend)
    for k in ks:
        top1, top5 = brute_force_knn(train, train_labels, test, test_labels, k, 0.07, num_classes)
        assert got[k][0] == pytest.approx(top1, abs=1e-9)
        assert got[k][1] == (None if k < 5 else pytest.approx(top5, abs=1e-9))
    assert 20 < got[20][0] < 100  # a non-trivial case: neither chance nor perfect


def test_knn_hand_computed_vote():
    """Query along x; neighbours by cosine: class 1 (0.9), class 0 (0.8), class 0 (0.7), class 1 (-1). k=3, T=0.07:
    class 1 scores e^(0.9/0.07) = 3.8e5 > class 0's e^(0.8/0.07) + e^(0.7/0.07) = 1.1e5, so 1 wins; at T=1,
    class 0 wins with e^0.8 + e^0.7 = 4.24 > e^0.9 = 2.46."""
    def unit(cos):
        return [cos, math.sqrt(1 - cos ** 2)]

    train = torch.tensor([unit(0.9), unit(0.8), unit(0.7), [-1.0, 0.0]])
    labels = torch.tensor([1, 0, 0, 1])
    query, target = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    assert knn_classify(train, labels, query, target, (3,), 0.07, 2)[3][0] == 100.0
    assert knn_classify(train, labels, query, target, (3,), 1.0, 2)[3][0] == 0.0
    assert knn_classify(train, labels, query, target, (1,), 1.0, 2)[1] == (100.0, None)


def test_knn_bad_inputs():
    feats, labels = torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 0])
    with pytest.raises(UserError, match="between 1 and the 5 training images"):
        knn_classify(feats, labels, feats, labels, (10,), 0.07, 2)
    with pytest.raises(UserError, match="at least one"):
        knn_classify(feats, labels, feats[:0], labels[:0], (1,), 0.07, 2)


def write_images(root, counts, size=32):
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((size, size, 3), 40 * i % 255, np.uint8)).save(root / name / f"{i}.png")


def test_cli_errors_are_one_line(tmp_path, capsys):
    save_features(tmp_path / "feats", torch.randn(6, 4), torch.randn(3, 4), torch.tensor([0, 1, 2, 0, 1, 2]),
                  torch.tensor([0, 1, 2]))
    argv = ["--load_features", str(tmp_path / "feats"), "--nb_knn", "10", "20"]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: eval_knn.main(parse_args(eval_knn.get_args_parser(), "eval_knn", argv)))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == ["error: --nb_knn 10 20 must lie between 1 and the 6 training "
                                                    "images: lower k or add training images"]
    args = eval_knn.get_args_parser().parse_args(["--load_features", str(tmp_path / "feats"), "--nb_knn", "2",
                                                  "--output_dir", str(tmp_path / "out")])
    results = eval_knn.main(args)
    record = json.loads((tmp_path / "out" / "knn.json").read_text())
    assert record == {"2": {"top1": results[2][0], "top5": None}}


def test_bad_data_folders(tmp_path):
    args = ["--arch", "vit_tiny", "--crop", 32, "--resize", 32, "--num_workers", 0, "--nb_knn", 1]
    write_images(tmp_path / "a" / "train", {"cat": 2, "dog": 2})
    write_images(tmp_path / "a" / "val", {"cat": 1, "fox": 1})
    with pytest.raises(UserError, match="val has class.*missing from.*train: fox;"):
        eval_knn.main(eval_knn.get_args_parser().parse_args(["--data_path", str(tmp_path / "a"), *map(str, args)]))
    write_images(tmp_path / "b" / "train", {"cat": 2})
    (tmp_path / "b" / "val" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match="no images found"):
        eval_knn.main(eval_knn.get_args_parser().parse_args(["--data_path", str(tmp_path / "b"), *map(str, args)]))
    with pytest.raises(UserError, match="must hold train/ and val/"):
        eval_knn.main(eval_knn.get_args_parser().parse_args(["--data_path", str(tmp_path), *map(str, args)]))


def test_missing_checkpoint_key_lists_keys(tmp_path):
    torch.save({"student": {"w": torch.zeros(1)}, "teacher": {"w": torch.zeros(1)}, "epoch": 3}, tmp_path / "c.pth")
    with pytest.raises(UserError, match="no key 'ema'.*one of: student, teacher$"):
        eval_knn.main(eval_knn.get_args_parser().parse_args(
            ["--pretrained_weights", str(tmp_path / "c.pth"), "--checkpoint_key", "ema"]))


def link_subset(src, dst, per_class):
    for class_dir in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / class_dir.name).mkdir(parents=True)
        for f in sorted(class_dir.iterdir())[:per_class]:
            (dst / class_dir.name / f.name).symlink_to(f)


def test_knn_on_real_imagenette_subset(shared_data, tmp_path):
    """A random ViT's [CLS] features still carry colour and layout statistics: on 10 Imagenette classes k-NN must
    beat chance (10%) clearly, and the trained-vs-random comparison of the demo rests on that baseline being sane."""
    root = shared_data / "imagenette-160"
    link_subset(root / "train", tmp_path / "data" / "train", 20)
    link_subset(root / "val", tmp_path / "data" / "val", 10)
    args = eval_knn.get_args_parser().parse_args(
        ["--data_path", str(tmp_path / "data"), "--arch", "vit_tiny", "--patch_size", "16", "--resize", "64",
         "--crop", "64", "--nb_knn", "10", "20", "--num_workers", "0", "--batch_size_per_gpu", "50"])
    results = eval_knn.main(args)
    print(results)
    assert set(results) == {10, 20}
    assert results[20][0] >= 20.0
    assert results[20][1] >= results[20][0]
