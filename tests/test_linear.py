import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import eval_linear
from core.errors import UserError
from core.features import save_features


def blobs(tmp_path, seed=0, num_classes=6, dim=8):
    """Well separated Gaussian clusters: a linearly separable problem, saved as a feature dump."""
    g = torch.Generator().manual_seed(seed)
    centers = 4 * torch.randn(num_classes, dim, generator=g)
    train_labels = torch.arange(240) % num_classes
    val_labels = torch.arange(60) % num_classes
    train = centers[train_labels] + 0.3 * torch.randn(240, dim, generator=g)
    val = centers[val_labels] + 0.3 * torch.randn(60, dim, generator=g)
    save_features(tmp_path / "feats", train, val, train_labels, val_labels)
    return tmp_path / "feats"


def run(*argv):
    return eval_linear.main(eval_linear.get_args_parser().parse_args([str(a) for a in argv]))


def cached_args(feats, out, *extra):
    return ["--load_features", feats, "--cached_features", "--output_dir", out, "--batch_size_per_gpu", 16, *extra]


def test_sweep_learns_separable_problem_and_keeps_official_layout(tmp_path):
    feats = blobs(tmp_path)
    result = run(*cached_args(feats, tmp_path / "out", "--epochs", 4, "--lr", 1e-5, 1.0))
    assert result == {"best_acc": 100.0, "best_lr": 1.0}
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pth.tar", weights_only=True)
    assert {"epoch", "state_dict", "optimizer", "scheduler", "best_acc"} <= set(ckpt)
    assert ckpt["epoch"] == 4 and ckpt["best_acc"] == 100.0
    assert set(ckpt["state_dict"]) == {"module.linear.weight", "module.linear.bias"}
    assert torch.equal(ckpt["state_dict"]["module.linear.weight"], ckpt["heads"]["1.linear.weight"])
    # lr x global batch / 256, then a per-epoch cosine to 0: after 4 of 4 epochs the lr is 0.
    groups = ckpt["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == pytest.approx([1e-5 * 16 / 256, 1.0 * 16 / 256])
    assert [g["lr"] for g in groups] == pytest.approx([0.0, 0.0], abs=1e-12)
    assert groups[1]["momentum"] == 0.9 and groups[1]["weight_decay"] == 0
    evaluated = run(*cached_args(feats, tmp_path / "out", "--evaluate"))
    assert evaluated == {"acc1": 100.0, "acc5": 100.0}


def test_cosine_schedule_and_init(tmp_path):
    feats = blobs(tmp_path)
    run(*cached_args(feats, tmp_path / "out", "--epochs", 3, "--lr", 0.5, 2.0, "--val_freq", 5))
    log = [json.loads(line) for line in (tmp_path / "out" / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2]
    for r in log:  # lr x batch / 256 x (1 + cos(pi epoch / epochs)) / 2, one value per epoch
        cosine = (1 + math.cos(math.pi * r["epoch"] / 3)) / 2
        assert r["train_lr"] == pytest.approx([0.5 * 16 / 256 * cosine, 2.0 * 16 / 256 * cosine])
    assert "test_acc1_lr0.5" not in log[1] and "test_acc1_lr0.5" in log[2]  # val every 5 epochs, and the last
    head = eval_linear.LinearClassifier(4096, 1000)
    assert head.linear.weight.std().item() == pytest.approx(0.01, rel=0.01)
    assert torch.count_nonzero(head.linear.bias) == 0


def test_sweep_head_trains_exactly_as_alone(tmp_path):
    feats = blobs(tmp_path)
    run(*cached_args(feats, tmp_path / "sweep", "--epochs", 2, "--lr", 0.01, 0.3))
    run(*cached_args(feats, tmp_path / "alone", "--epochs", 2, "--lr", 0.3))
    sweep = torch.load(tmp_path / "sweep" / "checkpoint.pth.tar", weights_only=True)["heads"]
    alone = torch.load(tmp_path / "alone" / "checkpoint.pth.tar", weights_only=True)["heads"]
    assert torch.equal(sweep["1.linear.weight"], alone["0.linear.weight"])
    assert torch.equal(sweep["1.linear.bias"], alone["0.linear.bias"])


def interrupted_then_resumed(monkeypatch, argv):
    """Run, stop right after the first epoch's checkpoint is written, then restart in the same folder."""
    real_save = eval_linear.save_checkpoint

    def save_then_stop(obj, path, write=None):
        real_save(obj, path, write)
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_linear, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(*argv)
    monkeypatch.undo()
    return run(*argv)


def final_state(out):
    ckpt = torch.load(out / "checkpoint.pth.tar", weights_only=True)
    return ckpt["heads"], ckpt["optimizer"]["state"], ckpt["epoch"]


def assert_same_state(a, b):
    assert a[2] == b[2]
    for x, y in zip(a[0].values(), b[0].values()):
        assert torch.equal(x, y)
    for key in a[1]:
        assert torch.equal(a[1][key]["momentum_buffer"], b[1][key]["momentum_buffer"])


def test_resume_cached_is_exact(tmp_path, monkeypatch):
    feats = blobs(tmp_path)
    run(*cached_args(feats, tmp_path / "once", "--epochs", 3, "--lr", 0.1, 1.0))
    interrupted_then_resumed(monkeypatch, cached_args(feats, tmp_path / "twice", "--epochs", 3, "--lr", 0.1, 1.0))
    assert_same_state(final_state(tmp_path / "once"), final_state(tmp_path / "twice"))


def write_images(root, counts, size=32):
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")


def test_resume_with_augmentation_is_exact(tmp_path, monkeypatch):
    """Random crops and flips drawn in a data-loading worker: the resumed run must draw the same ones."""
    write_images(tmp_path / "data" / "train", {"a": 6, "b": 6})
    write_images(tmp_path / "data" / "val", {"a": 2, "b": 2})
    argv = ["--data_path", tmp_path / "data", "--arch", "vit_tiny", "--patch_size", 16, "--resize", 32, "--crop", 32,
            "--n_last_blocks", 2, "--epochs", 2, "--batch_size_per_gpu", 4, "--num_workers", 1, "--lr", 0.1]
    run(*argv, "--output_dir", tmp_path / "once")
    interrupted_then_resumed(monkeypatch, [*argv, "--output_dir", tmp_path / "twice"])
    once, twice = final_state(tmp_path / "once"), final_state(tmp_path / "twice")
    assert once[0]["0.linear.weight"].shape == (2, 2 * 192)
    assert_same_state(once, twice)


def test_bad_inputs(tmp_path):
    feats = blobs(tmp_path)
    with pytest.raises(UserError, match="add --cached_features"):
        run("--load_features", feats, "--output_dir", tmp_path)
    with pytest.raises(UserError, match="fewer training images than one global batch"):
        run(*cached_args(feats, tmp_path / "out", "--batch_size_per_gpu", 1000))
    with pytest.raises(UserError, match="does not exist"):
        run(*cached_args(feats, tmp_path / "none", "--evaluate"))
    run(*cached_args(feats, tmp_path / "out", "--epochs", 1))
    with pytest.raises(UserError, match="head for 6 classes on 8-d features; this run has 9 classes"):
        run(*cached_args(feats, tmp_path / "out", "--evaluate", "--num_labels", 9))


def test_paper_recipes_in_configs():
    from core.config import parse_args

    base = parse_args(eval_linear.get_args_parser(), "eval_linear", ["--config", "vit_base"])
    small = parse_args(eval_linear.get_args_parser(), "eval_linear", ["--config", "vit_small", "--lr", "0.01"])
    assert (base.n_last_blocks, base.avgpool_patchtokens) == (1, True)
    assert (small.n_last_blocks, small.avgpool_patchtokens, small.lr) == (4, False, [0.01])
