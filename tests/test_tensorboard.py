"""--log_dir: TensorBoard event files, read back, hold the scalars each script logs, with the original MAE tags and
x-axis; tensorboard missing or an unwritable folder stops at start-up with one line."""
import json
import math
import sys

import numpy as np
import pytest
import torch

import eval_knn
import eval_linear
import main_dino
import main_finetune
import main_pretrain_mae
from conftest import make_images, one_line_error
from core.config import parse_args
from core.errors import UserError
from core.log import TensorBoard, epoch_1000x

pytest.importorskip("tensorboard", reason="the tensorboard package is not installed (an optional dependency)")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

SCRIPTS = {"main_dino": main_dino, "eval_knn": eval_knn, "eval_linear": eval_linear,
           "main_pretrain_mae": main_pretrain_mae, "main_finetune": main_finetune}
DINO_TINY = ["--arch", "vit_tiny", "--patch_size", "16", "--out_dim", "64", "--global_crops_size", "32",
             "--local_crops_size", "16", "--local_crops_number", "2", "--batch_size_per_gpu", "8", "--epochs", "2",
             "--warmup_epochs", "1", "--num_workers", "0", "--drop_path_rate", "0", "--device", "cpu",
             "--precision", "fp32", "--log_every", "1"]
VIT_TINY = ["--arch", "vit_tiny", "--embed_dim", "48", "--depth", "2", "--num_heads", "3", "--patch_size", "8",
            "--input_size", "32", "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1", "--num_workers", "0",
            "--device", "cpu", "--precision", "fp32"]
MAE_TINY = VIT_TINY + ["--decoder_embed_dim", "32", "--decoder_depth", "1", "--decoder_num_heads", "2", "--blr",
                       "1e-2", "--recon_freq", "0"]
EVAL_TINY = ["--arch", "vit_tiny", "--patch_size", "16", "--resize", "32", "--crop", "32", "--num_workers", "0",
             "--device", "cpu", "--batch_size_per_gpu", "4"]


def run(script, argv):
    return SCRIPTS[script].main(parse_args(SCRIPTS[script].get_args_parser(), script, argv))


def split_data(folder, n_train=8, n_val=4, size=36):
    make_images(folder / "train", n_train, size)
    make_images(folder / "val", n_val, size, seed=1)
    return folder


def scalars(log_dir):
    """{tag: [(step, value), ...]} from the event files in log_dir."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def log_lines(out):
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def test_epoch_1000x_matches_the_original_loop():
    """MAE's engine: data_iter_step over the loader's micro-batches, a point after every accum_iter-th one."""
    for steps, accum in ((3, 1), (4, 2), (5, 3)):
        expected = [int((i / (steps * accum) + epoch) * 1000) for epoch in range(3) for i in range(steps * accum)
                    if (i + 1) % accum == 0]
        assert [epoch_1000x(it, steps, accum) for it in range(3 * steps)] == expected
    assert epoch_1000x(5, 4, 2) == 1375  # epoch 1, step 1: micro-batch 3 of 8


def test_dino_scalars(tmp_path):
    data = make_images(tmp_path / "data", 16)
    out, tb = tmp_path / "out", tmp_path / "tb"
    run("main_dino", DINO_TINY + ["--data_path", str(data), "--output_dir", str(out), "--log_dir", str(tb)])
    logged = scalars(tb)
    assert {"train_loss", "lr", "wd", "teacher_momentum", "images_per_s"} <= set(logged)
    # 16 images, batch 8: 2 steps per epoch, 2 epochs, at thousandths of an epoch.
    for tag in ("train_loss", "lr", "wd", "teacher_momentum", "images_per_s"):
        assert [step for step, _ in logged[tag]] == [0, 500, 1000, 1500], tag
    # The schedules start where the recipe says: lr 0 (warm-up), wd 0.04, teacher momentum 0.996.
    assert logged["lr"][0][1] == 0.0
    assert logged["wd"][0][1] == pytest.approx(0.04)
    assert logged["teacher_momentum"][0][1] == pytest.approx(0.996)
    assert all(v > 0 for _, v in logged["images_per_s"])
    for epoch, record in enumerate(log_lines(out)):
        losses = [v for step, v in logged["train_loss"] if epoch * 1000 <= step < (epoch + 1) * 1000]
        assert np.mean(losses) == pytest.approx(record["train_loss"], rel=1e-5)
        last = (epoch + 1) * 2 - 1
        assert logged["lr"][last][1] == pytest.approx(record["train_lr"], rel=1e-5)
        assert logged["wd"][last][1] == pytest.approx(record["train_wd"], rel=1e-5)


def test_mae_pretraining_scalars_as_the_original(tmp_path):
    data = make_images(tmp_path / "data", 8)
    out, tb = tmp_path / "out", tmp_path / "tb"
    run("main_pretrain_mae", MAE_TINY + ["--data_path", str(data), "--output_dir", str(out), "--log_dir", str(tb)])
    logged = scalars(tb)
    assert {"train_loss", "lr"} <= set(logged)
    assert [step for step, _ in logged["train_loss"]] == [0, 500, 1000, 1500]
    # MAE's per-step schedule, by hand: 2 steps per epoch, 1 warm-up epoch, peak blr x 4 / 256 at epoch 1, then a
    # half-cycle cosine to 0 at epoch 2.
    peak = 1e-2 * 4 / 256
    hand = [0.0, peak * 0.5, peak, peak * (1 + math.cos(math.pi * 0.5)) / 2]
    assert [v for _, v in logged["lr"]] == pytest.approx(hand, rel=1e-6, abs=1e-12)
    for epoch, record in enumerate(log_lines(out)):
        losses = [v for step, v in logged["train_loss"] if epoch * 1000 <= step < (epoch + 1) * 1000]
        assert np.mean(losses) == pytest.approx(record["train_loss"], rel=1e-5)


def test_mae_accumulation_x_axis(tmp_path):
    data = make_images(tmp_path / "data", 8)
    tb = tmp_path / "tb"
    run("main_pretrain_mae", MAE_TINY + ["--batch_size", "2", "--accum_iter", "2", "--epochs", "1", "--data_path",
                                         str(data), "--output_dir", str(tmp_path / "out"), "--log_dir", str(tb)])
    # 4 micro-batches of 2 per epoch, a point after micro-batches 1 and 3, as the original.
    assert [step for step, _ in scalars(tb)["train_loss"]] == [250, 750]


def test_finetune_scalars_as_the_original(tmp_path):
    data = split_data(tmp_path / "data")
    out, tb = tmp_path / "out", tmp_path / "tb"
    run("main_finetune", VIT_TINY + ["--data_path", str(data), "--output_dir", str(out), "--log_dir", str(tb)])
    logged = scalars(tb)
    assert {"loss", "lr", "perf/test_acc1", "perf/test_acc5", "perf/test_loss"} <= set(logged)
    assert [step for step, _ in logged["loss"]] == [0, 500, 1000, 1500]
    for tag in ("acc1", "acc5", "loss"):
        assert [step for step, _ in logged[f"perf/test_{tag}"]] == [0, 1]
        assert [v for _, v in logged[f"perf/test_{tag}"]] == pytest.approx([r[f"test_{tag}"] for r in log_lines(out)],
                                                                            rel=1e-6)
    # The logged lr is the largest of the layer-decayed groups: the scheduled lr itself (the head's scale is 1).
    assert logged["lr"][1][1] == pytest.approx(log_lines(out)[0]["train_lr"], rel=1e-6)


def test_finetune_eval_writes_no_events(tmp_path):
    data = split_data(tmp_path / "data")
    out, tb = tmp_path / "out", tmp_path / "tb"
    run("main_finetune", VIT_TINY + ["--epochs", "1", "--data_path", str(data), "--output_dir", str(out)])
    run("main_finetune", VIT_TINY + ["--eval", "--data_path", str(data), "--output_dir", str(out), "--log_dir",
                                     str(tb)])
    assert not tb.exists()  # the original opens no writer for --eval either


def test_knn_and_linear_scalars(tmp_path):
    data = split_data(tmp_path / "data", size=32)
    tb = tmp_path / "tb_knn"
    results = run("eval_knn", EVAL_TINY + ["--nb_knn", "1", "3", "--data_path", str(data), "--log_dir", str(tb)])
    logged = scalars(tb)
    assert logged["knn_top1"] == [(k, pytest.approx(results[k][0])) for k in (1, 3)]
    out, tb = tmp_path / "linear", tmp_path / "tb_linear"
    run("eval_linear", EVAL_TINY + ["--cached_features", "--epochs", "2", "--lr", "0.01", "0.1", "--n_last_blocks",
                                    "1", "--data_path", str(data), "--output_dir", str(out), "--log_dir", str(tb)])
    logged = scalars(tb)
    for lr in ("0.01", "0.1"):
        assert [v for _, v in logged[f"test_acc1/lr{lr}"]] == pytest.approx(
            [r[f"test_acc1_lr{lr}"] for r in log_lines(out)])
        assert [v for _, v in logged[f"train_loss/lr{lr}"]] == pytest.approx(
            [r[f"train_loss_lr{lr}"] for r in log_lines(out)], rel=1e-6)
    assert [step for step, _ in logged["images_per_s"]] == [0, 1]


def cli_error(script, argv, capsys):
    return one_line_error(lambda: run(script, argv), capsys)


def test_missing_tensorboard_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(UserError, match="pip install tensorboard"):
        TensorBoard(tmp_path / "tb")
    assert TensorBoard(None).writer is None  # without --log_dir nothing is needed
    data = make_images(tmp_path / "data", 16)
    out = tmp_path / "out"
    err = cli_error("main_dino", DINO_TINY + ["--data_path", str(data), "--output_dir", str(out), "--log_dir",
                                              str(tmp_path / "tb")], capsys)
    assert "tensorboard" in err and "--log_dir" in err
    assert not (out / "checkpoint.pth").exists() and not (tmp_path / "tb").exists()


@pytest.mark.parametrize("script,argv", [("main_dino", DINO_TINY), ("main_pretrain_mae", MAE_TINY),
                                         ("main_finetune", VIT_TINY), ("eval_knn", EVAL_TINY),
                                         ("eval_linear", EVAL_TINY)])
def test_unwritable_log_dir_stops_at_start(script, argv, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    out = tmp_path / "out"
    argv = argv + ["--data_path", str(tmp_path / "never_read"), "--log_dir", str(tmp_path / "file" / "tb")]
    if script != "eval_knn":
        argv += ["--output_dir", str(out)]
    err = cli_error(script, argv, capsys)
    assert "--log_dir" in err and "not writable" in err
    assert not (out / "checkpoint.pth").exists()


def test_writer_only_on_the_main_process(tmp_path, monkeypatch):
    monkeypatch.setattr("core.log.is_main_process", lambda: False)
    tb = TensorBoard(tmp_path / "tb")
    tb.add(0, {"x": 1.0})
    tb.close()
    assert tb.on and tb.writer is None and not list((tmp_path / "tb").glob("events.*"))
    assert torch.tensor(tb.mean(2.5, torch.device("cpu"))).item() == 2.5  # one process: its own value
