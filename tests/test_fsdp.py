"""Runs on 2 gloo processes under torchrun: FSDP agrees with DDP and with one process on the same global batch, and
checkpoints move between sharded and unsharded runs; MAE's masks no longer depend on the number of processes."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import main_dino
import main_pretrain_mae
from core.checkpoint import load_pretrained_weights
from core.config import parse_args
from core.errors import run_cli
from core.vision_transformer import build_vit
from test_main_dino import REPO, TINY, free_port, make_images
from test_mae import TINY as MAE_TINY

DINO_PER_PROCESS = [a if a != "8" else "4" for a in TINY]  # global batch 8 on 2 processes
MAE_PER_PROCESS = [a if a != "4" or MAE_TINY[i - 1] != "--batch_size" else "2" for i, a in enumerate(MAE_TINY)]


def torchrun(script, argv):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), script, *argv], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def load(path):
    return torch.load(path, weights_only=True)


def assert_close(a, b, atol, where=""):
    """Nested dicts and lists of tensors and numbers, equal in structure and close in value."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_close(a[k], b[k], atol, f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, atol, f"{where}/{i}")
    elif torch.is_tensor(a):
        assert a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=atol, rtol=0), where
    else:
        assert a == pytest.approx(b, abs=atol), where


def losses(out):
    return [json.loads(line)["train_loss"] for line in (out / "log.txt").read_text().splitlines()]


def test_dino_fsdp_matches_ddp_and_checkpoints_cross_over(tmp_path):
    data = make_images(tmp_path / "data", 16)
    argv = DINO_PER_PROCESS + ["--data_path", str(data)]
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    torchrun("main_dino.py", argv + ["--output_dir", str(ddp)])
    # The sharded run starts from the DDP run's first epoch: a DDP checkpoint loads into sharded weights and
    # optimizer state, and the sharded epoch that follows matches DDP's.
    fsdp.mkdir()
    shutil.copy(ddp / "checkpoint0000.pth", fsdp / "checkpoint.pth")
    torchrun("main_dino.py", argv + ["--fsdp", "true", "--output_dir", str(fsdp)])
    a, b = load(ddp / "checkpoint.pth"), load(fsdp / "checkpoint.pth")
    assert a["epoch"] == b["epoch"] == 2
    # Consolidated, the sharded run's checkpoint is the DDP run's: same keys (optimizer states numbered alike),
    # shapes and values, so it resumes wherever that one does, and evaluations read it.
    for key in ("student", "teacher", "dino_loss", "optimizer"):
        assert_close(a[key], b[key], 1e-5, key)
    assert losses(fsdp) == pytest.approx(losses(ddp)[1:], abs=1e-5)
    load_pretrained_weights(build_vit("vit_tiny", 16, img_size=32), fsdp / "checkpoint.pth")


def test_mae_ddp_and_fsdp_on_two_processes_match_one(tmp_path):
    data = make_images(tmp_path / "data", 8)
    one, ddp, fsdp = tmp_path / "one", tmp_path / "ddp", tmp_path / "fsdp"
    main_pretrain_mae.main(parse_args(main_pretrain_mae.get_args_parser(), "main_pretrain_mae",
                                      MAE_TINY + ["--data_path", str(data), "--output_dir", str(one)]))
    argv = MAE_PER_PROCESS + ["--data_path", str(data)]
    torchrun("main_pretrain_mae.py", argv + ["--output_dir", str(ddp)])
    torchrun("main_pretrain_mae.py", argv + ["--fsdp", "--output_dir", str(fsdp)])
    reference = load(one / "checkpoint.pth")
    for out in (ddp, fsdp):
        ckpt = load(out / "checkpoint.pth")
        assert ckpt["epoch"] == reference["epoch"] == 1
        assert_close(reference["model"], ckpt["model"], 1e-5, str(out))
        assert_close(reference["optimizer"], ckpt["optimizer"], 1e-5, str(out))
        assert losses(out) == pytest.approx(losses(one), abs=1e-5)


@pytest.mark.parametrize("script", [main_dino, main_pretrain_mae])
def test_fsdp_on_one_process_is_refused(script, tmp_path, capsys):
    section = script.__name__
    argv = (TINY + ["--fsdp", "true"]) if script is main_dino else (MAE_TINY + ["--fsdp"])
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: script.main(parse_args(script.get_args_parser(), section,
                                               argv + ["--output_dir", str(tmp_path)])))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert err.startswith("error: --fsdp on CPU needs more than one process") and "torchrun" in err
