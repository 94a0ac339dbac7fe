import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval_knn
from core.augment import eval_transform
from core.data import ImageDataset
from core.errors import UserError
from core.features import (block_features, extract_features, labelled_datasets, load_features, save_features)
from core.vision_transformer import VisionTransformer

REPO = Path(__file__).resolve().parents[1]


def write_images(root, counts, size=32, seed=0):
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")


def tiny_vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3).eval()


def test_extract_in_dataset_order_skipping_unreadable(tmp_path):
    write_images(tmp_path, {"a": 3, "b": 4})
    (tmp_path / "b" / "1.png").write_bytes(b"not an image")
    dataset = ImageDataset(tmp_path, eval_transform(32, 32))
    model = tiny_vit()
    with pytest.warns(UserWarning, match="skipping unreadable"):
        features, labels = extract_features(model, dataset, torch.device("cpu"), "fp32", batch_size=3, num_workers=0)
    kept = [i for i in range(len(dataset)) if dataset.samples[i][0] != str(tmp_path / "b" / "1.png")]
    with torch.no_grad():
        expected = torch.cat([model(dataset[i][0][None]) for i in kept])
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)
    assert labels.tolist() == [dataset.targets[i] for i in kept] == [0, 0, 0, 1, 1, 1]


def test_block_features_follow_the_official_layout():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        layers = model.get_intermediate_layers(x, 3)
        cls = [h[:, 0] for h in layers]
        torch.testing.assert_close(block_features(model, x), model(x))
        torch.testing.assert_close(block_features(model, x, 1), layers[-1][:, 0])
        torch.testing.assert_close(block_features(model, x, 3), torch.cat(cls, dim=-1))
        # The official code with avgpool: cat((cls.unsqueeze(-1), mean.unsqueeze(-1)), -1).reshape(B, -1).
        mean = layers[-1][:, 1:].mean(dim=1)
        official = torch.cat((cls[-1].unsqueeze(-1), mean.unsqueeze(-1)), dim=-1).reshape(2, -1)
        torch.testing.assert_close(block_features(model, x, 1, avgpool=True), official)
        assert official[0, 0] == cls[-1][0, 0] and official[0, 1] == mean[0, 0]


def test_val_labels_follow_train_classes(tmp_path):
    write_images(tmp_path / "train", {"a": 1, "b": 1, "c": 1})
    write_images(tmp_path / "val", {"a": 1, "c": 2})
    train, val = labelled_datasets(tmp_path, None, None)
    assert val.targets == [0, 2, 2] and val.classes == ["a", "b", "c"]
    with pytest.raises(UserError, match="no class subfolders"):
        flat = tmp_path / "flat"
        (flat / "train").mkdir(parents=True)
        (flat / "val").mkdir()
        Image.new("RGB", (8, 8)).save(flat / "train" / "x.png")
        Image.new("RGB", (8, 8)).save(flat / "val" / "y.png")
        labelled_datasets(flat, None, None)


def test_save_and_load_features(tmp_path):
    tensors = (torch.randn(5, 3), torch.randn(2, 3), torch.arange(5), torch.arange(2))
    save_features(tmp_path / "f", *tensors)
    for got, want in zip(load_features(tmp_path / "f"), tensors):
        assert torch.equal(got, want)
    with pytest.raises(UserError, match="lacks trainfeat.pth"):
        load_features(tmp_path)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_gather_like_one(tmp_path):
    """7 train and 5 val images over 2 processes: the padded sampler repeats one image on rank 1, which must not
    show up twice; the gathered features equal a single process's, row for row."""
    write_images(tmp_path / "data" / "train", {"a": 3, "b": 2, "c": 2})
    write_images(tmp_path / "data" / "val", {"a": 2, "c": 3}, seed=1)
    flags = ["--data_path", tmp_path / "data", "--arch", "vit_tiny", "--patch_size", 16, "--resize", 32, "--crop",
             32, "--batch_size_per_gpu", 2, "--num_workers", 0, "--nb_knn", 1, 3, "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "eval_knn.py"), *map(str, flags), "--dump_features", str(tmp_path / "two")]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    one = eval_knn.main(eval_knn.get_args_parser().parse_args(
        [*map(str, flags), "--dump_features", str(tmp_path / "one")]))
    single, double = load_features(tmp_path / "one"), load_features(tmp_path / "two")
    assert [len(t) for t in double] == [7, 5, 7, 5]
    assert double[2].tolist() == [0, 0, 0, 1, 1, 2, 2] and double[3].tolist() == [0, 0, 2, 2, 2]
    for a, b in zip(single, double):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert "2 process(es) on cpu" in out.stdout
    assert "1-NN classifier result: Top1: " + f"{one[1][0]:.2f}" in out.stdout
