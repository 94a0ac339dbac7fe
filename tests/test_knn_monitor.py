"""The k-NN monitor of the pretraining scripts: the number eval_knn.py gives on the saved checkpoint, a run that is
the same with and without it, and its bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import eval_knn
import main_dino
import main_pretrain_mae
from conftest import one_line_error
from core.augment import eval_resize
from core.config import parse_args
from core.errors import UserError
from core.knn import KNNMonitor
from tests.conftest import REPO
from tests.test_main_dino import free_port

SIZE = 32
DINO = ["--arch", "vit_tiny", "--patch_size", "16", "--out_dim", "64", "--global_crops_size", str(SIZE),
        "--local_crops_size", "16", "--local_crops_number", "1", "--batch_size_per_gpu", "8", "--epochs", "1",
        "--warmup_epochs", "1", "--num_workers", "0", "--drop_path_rate", "0", "--saveckp_freq", "0",
        "--device", "cpu", "--precision", "fp32"]
MAE = ["--arch", "vit_tiny", "--depth", "2", "--patch_size", "8", "--input_size", str(SIZE), "--decoder_embed_dim",
       "32", "--decoder_depth", "1", "--decoder_num_heads", "2", "--batch_size", "8", "--epochs", "1",
       "--warmup_epochs", "1", "--num_workers", "0", "--recon_freq", "0", "--saveckp_freq", "0", "--device", "cpu",
       "--precision", "fp32"]


def labelled_folder(root, per_class=(12, 6), classes=3, size=40):
    """train/ and val/ ImageFolder trees whose classes differ in mean colour by about as much as images of a class
    do, under strong pixel noise, so that k-NN on any backbone lands between chance and perfect."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for c in range(classes):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                mean = 128 + np.roll([-10, 0, 10], c) + rng.normal(0, 12, 3)
                pixels = np.clip(mean + rng.normal(0, 60, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / f"class{c}" / f"{i:03d}.png")
    return root


def run_dino(argv):
    return main_dino.main(parse_args(main_dino.get_args_parser(), "main_dino", argv))


def run_mae(argv):
    return main_pretrain_mae.main(parse_args(main_pretrain_mae.get_args_parser(), "main_pretrain_mae", argv))


def log_records(out):
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def eval_knn_top1(checkpoint, data, checkpoint_key, batch_size=8):
    args = eval_knn.get_args_parser().parse_args(
        ["--pretrained_weights", str(checkpoint), "--checkpoint_key", checkpoint_key, "--data_path", str(data),
         "--resize", str(eval_resize(SIZE)), "--crop", str(SIZE), "--nb_knn", "20", "--knn_backend", "torch",
         "--batch_size_per_gpu", str(batch_size), "--num_workers", "0", "--device", "cpu", "--precision", "fp32"])
    return eval_knn.main(args)[20][0]


@pytest.mark.parametrize("script", ["dino", "mae"])
def test_monitor_equals_eval_knn_on_the_checkpoint(script, tmp_path):
    data = labelled_folder(tmp_path / "data", per_class=(10, 5))
    out = tmp_path / "out"
    knn = ["--knn_every", "1", "--knn_data_path", str(data), "--data_path", str(data / "train"),
           "--output_dir", str(out)]
    if script == "dino":
        run_dino(DINO + knn)
        expected = eval_knn_top1(out / "checkpoint.pth", data, "teacher")
    else:
        run_mae(MAE + knn)
        expected = eval_knn_top1(out / "checkpoint.pth", data, "model")
    (record,) = log_records(out)
    assert record["knn_top1"] == expected
    assert 0 < expected < 100


def test_two_processes_extract_their_shards(tmp_path):
    """Under torchrun each process extracts its shard of the monitor's images; gathered, they give the number that
    one process running eval_knn.py gives on the checkpoint."""
    data = labelled_folder(tmp_path / "data", per_class=(10, 5))
    out = tmp_path / "two"
    argv = [a if a != "8" else "4" for a in DINO]  # the same global batch: 2 x 4
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(free_port()), "main_dino.py", *argv, "--knn_every", "1", "--knn_data_path", str(data),
                    "--data_path", str(data / "train"), "--output_dir", str(out)], cwd=REPO, env=env, check=True,
                   capture_output=True)
    (record,) = log_records(out)
    assert record["knn_top1"] == eval_knn_top1(out / "checkpoint.pth", data, "teacher", batch_size=4)


@pytest.mark.parametrize("script", ["dino", "mae"])
def test_monitor_leaves_the_run_unchanged(script, tmp_path):
    """Two epochs with and without the monitor end with equal weights, random state and losses.
    Every DINO step draws stochastic depth, every MAE step its masks, from the global generator."""
    data = labelled_folder(tmp_path / "data", per_class=(10, 5))
    if script == "dino":
        run, argv, keys = run_dino, DINO + ["--drop_path_rate", "0.5"], ("student", "teacher", "dino_loss")
    else:
        run, argv, keys = run_mae, MAE, ("model",)
    common = argv + ["--epochs", "2", "--data_path", str(data / "train")]
    run(common + ["--output_dir", str(tmp_path / "plain")])
    run(common + ["--output_dir", str(tmp_path / "watched"), "--knn_every", "1", "--knn_data_path", str(data)])
    plain = torch.load(tmp_path / "plain" / "checkpoint.pth", weights_only=True)
    watched = torch.load(tmp_path / "watched" / "checkpoint.pth", weights_only=True)
    for key in keys:
        assert plain[key].keys() == watched[key].keys()
        for name in plain[key]:
            assert torch.equal(plain[key][name], watched[key][name]), (key, name)
    assert torch.equal(plain["rng"][0]["torch"], watched["rng"][0]["torch"])
    records = log_records(tmp_path / "watched")
    assert [r["epoch"] for r in records if "knn_top1" in r] == [0, 1]
    assert [r["train_loss"] for r in records] == [r["train_loss"] for r in log_records(tmp_path / "plain")]


def test_monitor_restores_mode_and_random_state(tmp_path):
    """The features come in eval mode, and even an embedding that draws random numbers leaves the generator as it
    was; afterwards the model is back in training mode."""
    data = labelled_folder(tmp_path / "data", per_class=(8, 2), classes=3)
    monitor = KNNMonitor(data, SIZE, every=1, epochs=1, batch_size=4, num_workers=0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(3 * SIZE * SIZE, 8))
    modes = []

    def embed(images):
        modes.append(model.training)
        return model(images) + 1e-6 * torch.rand(len(images), 8)

    model.train()
    before = torch.get_rng_state()
    monitor(model, torch.device("cpu"), "fp32", embed)
    assert modes and not any(modes)
    assert all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), before)


def test_training_subset_is_fixed_and_seeded(tmp_path):
    data = labelled_folder(tmp_path / "data", per_class=(20, 2), size=8)
    full = KNNMonitor(data, 8, every=1, epochs=1)
    subsets = [KNNMonitor(data, 8, every=1, epochs=1, max_train=25).train.samples for _ in range(2)]
    assert subsets[0] == subsets[1] and len(subsets[0]) == 25
    assert subsets[0] == sorted(subsets[0]) and set(subsets[0]) < set(full.train.samples)
    assert len({label for _, label in subsets[0]}) == 3
    with pytest.raises(UserError, match="--knn_max_train must be at least k = 20, got -5"):
        KNNMonitor(data, 8, every=1, epochs=1, max_train=-5)
    with pytest.raises(UserError, match="needs at least 20 training images.* has 9: add images"):
        KNNMonitor(labelled_folder(tmp_path / "small", per_class=(3, 1), size=8), 8, every=1, epochs=1)


def test_due_every_n_epochs_and_at_the_last(tmp_path):
    monitor = KNNMonitor(labelled_folder(tmp_path / "data", per_class=(7, 1), size=8), 8, every=3, epochs=8)
    assert [e for e in range(8) if monitor.due(e)] == [2, 5, 7]


def cli_error(run, argv, capsys):
    return one_line_error(lambda: run(argv), capsys)


@pytest.mark.parametrize("run, argv", [(run_dino, DINO), (run_mae, MAE)])
def test_bad_monitor_flags(run, argv, tmp_path, capsys):
    data = labelled_folder(tmp_path / "data", per_class=(8, 2), size=8)
    argv = argv + ["--data_path", str(data / "train"), "--output_dir", str(tmp_path / "out")]
    assert "--knn_every must be 0" in cli_error(run, argv + ["--knn_every", "-1"], capsys)
    assert "needs --knn_data_path" in cli_error(run, argv + ["--knn_every", "2"], capsys)
    err = cli_error(run, argv + ["--knn_every", "1", "--knn_data_path", str(data), "--knn_max_train", "5"], capsys)
    assert "--knn_max_train must be at least" in err
    (tmp_path / "no_val" / "train").mkdir(parents=True)
    err = cli_error(run, argv + ["--knn_every", "1", "--knn_data_path", str(tmp_path / "no_val")], capsys)
    assert f"{tmp_path / 'no_val' / 'val'} is not a folder" in err
    assert not (tmp_path / "out" / "checkpoint.pth").exists()  # stopped at start-up, before any training
