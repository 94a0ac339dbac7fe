"""End-to-end DINO runs on tiny data: resume exactness, torchrun agreement, bad input, real images."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import main_dino
from conftest import one_line_error
from core.config import parse_args
from core.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--arch", "vit_tiny", "--patch_size", "16", "--out_dim", "64", "--global_crops_size", "32",
        "--local_crops_size", "16", "--local_crops_number", "2", "--batch_size_per_gpu", "8", "--epochs", "2",
        "--warmup_epochs", "1", "--num_workers", "1", "--drop_path_rate", "0", "--saveckp_freq", "1",
        "--device", "cpu", "--precision", "fp32"]


def make_images(folder, n, classes=("a", "b"), size=40, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = folder / classes[i % len(classes)] if classes else folder
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(sub / f"{i:03d}.png")
    return folder


def run(argv):
    return main_dino.main(parse_args(main_dino.get_args_parser(), "main_dino", argv))


def final_weights(out_dir):
    return torch.load(out_dir / "checkpoint.pth", weights_only=True)


def assert_same_state(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), k


def test_resume_is_exact(tmp_path):
    data = make_images(tmp_path / "data", 16)
    run(TINY + ["--data_path", str(data), "--output_dir", str(tmp_path / "once")])
    interrupted = tmp_path / "twice"
    run(TINY + ["--data_path", str(data), "--output_dir", str(interrupted)])
    # Simulate a run killed after its first epoch: only the epoch-0 checkpoint and its log line survive.
    shutil.copy(interrupted / "checkpoint0000.pth", interrupted / "checkpoint.pth")
    log_lines = (interrupted / "log.txt").read_text().splitlines()
    (interrupted / "log.txt").write_text(log_lines[0] + "\n")
    run(TINY + ["--data_path", str(data), "--output_dir", str(interrupted)])
    once, resumed = final_weights(tmp_path / "once"), final_weights(interrupted)
    assert once["epoch"] == resumed["epoch"] == 2
    for key in ("student", "teacher", "dino_loss"):
        assert_same_state(once[key], resumed[key])
    assert (tmp_path / "once" / "log.txt").read_text() == (interrupted / "log.txt").read_text()


def test_checkpoint_layout(tmp_path):
    data = make_images(tmp_path / "data", 16)
    run(TINY + ["--epochs", "1", "--data_path", str(data), "--output_dir", str(tmp_path / "out")])
    ckpt = final_weights(tmp_path / "out")
    assert {"student", "teacher", "optimizer", "epoch", "args", "dino_loss"} <= set(ckpt)
    assert all(k.startswith("module.backbone.") or k.startswith("module.head.") for k in ckpt["student"])
    assert "backbone.cls_token" in ckpt["teacher"] and "head.last_layer.weight_g" in ckpt["teacher"]
    assert ckpt["args"]["arch"] == "vit_tiny" and isinstance(ckpt["args"], dict)
    record = json.loads((tmp_path / "out" / "log.txt").read_text())
    assert record["epoch"] == 0 and np.isfinite(record["train_loss"])
    assert (tmp_path / "out" / "checkpoint0000.pth").is_file()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one(tmp_path):
    data = make_images(tmp_path / "data", 16)
    run(TINY + ["--data_path", str(data), "--output_dir", str(tmp_path / "one")])
    two = [a if a != "8" else "4" for a in TINY]  # same global batch: 2 x 4
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(free_port()), "main_dino.py", *two, "--data_path", str(data), "--output_dir",
                    str(tmp_path / "two")], cwd=REPO, env=env, check=True, capture_output=True)
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert_same_state(one["student"], two["student"], atol=1e-5)
    assert_same_state(one["teacher"], two["teacher"], atol=1e-5)
    assert_same_state(one["dino_loss"], two["dino_loss"], atol=1e-6)
    loss_one = json.loads((tmp_path / "one" / "log.txt").read_text().splitlines()[-1])["train_loss"]
    loss_two = json.loads((tmp_path / "two" / "log.txt").read_text().splitlines()[-1])["train_loss"]
    assert loss_one == pytest.approx(loss_two, abs=1e-5)


def test_corrupt_image_skipped_and_counted(tmp_path, recwarn):
    data = make_images(tmp_path / "data", 17)
    (data / "a" / "broken.png").write_bytes(b"\x89PNG garbage")
    run(TINY + ["--epochs", "1", "--num_workers", "0", "--data_path", str(data),
                "--output_dir", str(tmp_path / "out")])
    record = json.loads((tmp_path / "out" / "log.txt").read_text())
    assert record["train_skipped_images"] == 1
    assert any("broken.png" in str(w.message) for w in recwarn)


def test_flat_folder_without_classes(tmp_path):
    data = make_images(tmp_path / "flat", 16, classes=None)
    run(TINY + ["--epochs", "1", "--data_path", str(data), "--output_dir", str(tmp_path / "out")])
    assert final_weights(tmp_path / "out")["epoch"] == 1


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch):
    data = make_images(tmp_path / "data", 16)
    out = tmp_path / "out"
    run(TINY + ["--epochs", "1", "--data_path", str(data), "--output_dir", str(out)])
    before = (out / "checkpoint.pth").read_bytes()
    monkeypatch.setattr(main_dino.DINOLoss, "forward", lambda self, s, t, e: (s.sum() + t.sum()) * float("nan"))
    with pytest.raises(UserError, match=r"loss is nan at iteration 2 \(epoch 1\)"):
        run(TINY + ["--data_path", str(data), "--output_dir", str(out)])
    assert (out / "checkpoint.pth").read_bytes() == before


def cli_error(argv, capsys):
    return one_line_error(lambda: run(argv), capsys)


def test_bad_input_is_one_line(tmp_path, capsys):
    out = ["--output_dir", str(tmp_path / "out")]
    assert "does not exist" in cli_error(TINY + ["--data_path", str(tmp_path / "missing")] + out, capsys)
    (tmp_path / "empty").mkdir()
    assert "no images found" in cli_error(TINY + ["--data_path", str(tmp_path / "empty")] + out, capsys)
    data = make_images(tmp_path / "data", 16)
    assert "unknown arch" in cli_error(TINY + ["--arch", "vit_huge", "--data_path", str(data)] + out, capsys)
    assert "unknown config" in cli_error(["--config", "nope"], capsys)
    (tmp_path / "file").write_text("")
    err = cli_error(TINY + ["--data_path", str(data), "--output_dir", str(tmp_path / "file" / "sub")], capsys)
    assert "not writable" in err
    # A checkpoint of another architecture already in the output folder is refused and left untouched.
    run(TINY + ["--epochs", "1", "--data_path", str(data)] + out)
    before = (tmp_path / "out" / "checkpoint.pth").read_bytes()
    err = cli_error(TINY + ["--arch", "vit_small", "--data_path", str(data)] + out, capsys)
    assert "cannot resume" in err
    assert (tmp_path / "out" / "checkpoint.pth").read_bytes() == before


def test_cli_exit_status(tmp_path):
    proc = subprocess.run([sys.executable, "main_dino.py", "--data_path", str(tmp_path / "missing"),
                           "--output_dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: data path {tmp_path / 'missing'} does not exist; "
                                                f"give an existing folder of images"]


def test_short_run_on_real_images(tmp_path, shared_data):
    source = shared_data / "imagenette-160" / "train"
    data = tmp_path / "subset"
    for cls in sorted(os.listdir(source))[:4]:
        (data / cls).mkdir(parents=True)
        for name in sorted(os.listdir(source / cls))[:8]:
            os.symlink(source / cls / name, data / cls / name)
    run(TINY + ["--epochs", "1", "--global_crops_size", "64", "--local_crops_size", "32",
                "--data_path", str(data), "--output_dir", str(tmp_path / "out")])
    record = json.loads((tmp_path / "out" / "log.txt").read_text())
    assert record["train_skipped_images"] == 0
    # 64 logits with a near-uniform student: the loss sits close to ln(64) early on.
    assert 0.5 * np.log(64) < record["train_loss"] < 1.5 * np.log(64)
