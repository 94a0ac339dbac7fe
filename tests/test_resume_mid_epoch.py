"""Resume within an epoch: a run SIGKILLed (DINO) or crashed (MAE, fine-tuning) mid-epoch and restarted ends
exactly as an uninterrupted run, with the same weights and the same log.txt."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torchvision.transforms import v2

import main_finetune
import main_pretrain_mae
from core.checkpoint import MidEpochCheckpoints
from core.config import parse_args
from core.data import ImageDataset, MicroBatches, build_loader
from core.errors import run_cli
from test_finetune import TINY as FINETUNE_TINY
from test_finetune import make_split
from test_finetune import run as run_finetune
from test_mae import TINY as MAE_TINY
from test_mae import make_images as make_mae_images
from test_mae import run as run_mae
from test_main_dino import REPO, TINY, make_images, run

# 16 images in batches of 4: four steps an epoch; the loss is read (and a checkpoint is due) every second step.
MID_EPOCH = [a if a != "8" else "4" for a in TINY] + ["--log_every", "2", "--checkpoint_every_minutes", "1e-9"]

# The training script as a user runs it, except that the teacher update of one step never returns, so that the
# test can kill the process at a known point: after the checkpoint of step 2 of epoch 1, within step 3.
STALLING = """
import sys, time
import main_dino
from core.config import parse_args
from core.errors import run_cli
stall_at, calls, ema_update = int(sys.argv[1]), [0], main_dino.ema_update
def stalling_ema_update(*args):
    calls[0] += 1
    if calls[0] == stall_at:
        time.sleep(600)
    ema_update(*args)
main_dino.ema_update = stalling_ema_update
run_cli(lambda: main_dino.main(parse_args(main_dino.get_args_parser(), "main_dino", sys.argv[2:])))
"""


def read_checkpoint(path):
    try:
        return torch.load(path, weights_only=True)
    except (FileNotFoundError, RuntimeError, EOFError):
        return None


def kill_when(proc, path, position, timeout=120):
    """SIGKILL `proc` once the checkpoint at `path` holds `position` (epoch, epoch_step)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        ckpt = read_checkpoint(path)
        if ckpt is not None and (ckpt["epoch"], ckpt.get("epoch_step")) == position:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return ckpt
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"the run never wrote a checkpoint at {position}: {proc.communicate()[1].decode()[-2000:]}")


def test_sigkill_mid_epoch_then_restart_is_exact(tmp_path):
    data = make_images(tmp_path / "data", 16)
    args = MID_EPOCH + ["--data_path", str(data)]
    run(args + ["--output_dir", str(tmp_path / "once")])

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.Popen([sys.executable, "-c", STALLING, "7", *args, "--output_dir", str(killed)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = kill_when(proc, killed / "checkpoint.pth", (1, 2))
    assert proc.returncode == -signal.SIGKILL
    assert [len(t) for t in ckpt["epoch_totals"]] == [3] and ckpt["optimizer"]["state"]
    assert len((killed / "log.txt").read_text().splitlines()) == 1  # epoch 0 was logged, epoch 1 was not

    run(args + ["--output_dir", str(killed)])
    once, resumed = (torch.load(d / "checkpoint.pth", weights_only=True) for d in (tmp_path / "once", killed))
    assert once["epoch"] == resumed["epoch"] == 2 and "epoch_step" not in resumed
    for key in ("student", "teacher", "dino_loss"):
        assert once[key].keys() == resumed[key].keys()
        for name in once[key]:
            assert torch.equal(once[key][name], resumed[key][name]), (key, name)
    assert (tmp_path / "once" / "log.txt").read_text() == (killed / "log.txt").read_text()


def halve_batch(argv):
    return [str(int(a) // 2) if argv[i - 1] == "--batch_size" else a for i, a in enumerate(argv)]


def mae_args(tmp_path):
    """8 images in batches of 2: four steps an epoch."""
    return halve_batch(MAE_TINY) + ["--data_path", str(make_mae_images(tmp_path / "data", 8))]


def finetune_args(tmp_path):
    """12 images in batches of 2: six steps an epoch, with the full recipe (mixup, cutmix, RandAugment, erasing)."""
    data = tmp_path / "data"
    make_split(data / "train", "abc", 4)
    make_split(data / "val", "abc", 2, seed=1)
    return halve_batch(FINETUNE_TINY) + ["--data_path", str(data)]


@pytest.mark.parametrize("script, script_args, crash_at, position", [
    (main_pretrain_mae, mae_args, 7, (0, 2)),     # in step 3 of epoch 1, after the checkpoint of its step 2
    (main_finetune, finetune_args, 10, (0, 3)),   # in step 4 of epoch 1, after the checkpoint of its step 3
], ids=["mae", "finetune"])
def test_crash_mid_epoch_then_restart_is_exact(script, script_args, crash_at, position, tmp_path, monkeypatch):
    """A checkpoint at every step; the run dies within a step (the error unwinds, nothing more is written) and
    a restart in the same folder ends as the uninterrupted run. `epoch` is the last finished epoch, as MAE's."""
    args = script_args(tmp_path) + ["--checkpoint_every_minutes", "1e-9"]

    def run_script(out):
        script.main(parse_args(script.get_args_parser(), script.__name__, args + ["--output_dir", str(out)]))

    run_script(tmp_path / "once")
    crashed = tmp_path / "crashed"
    calls, apply_gradients = [0], script.apply_gradients

    def crashing_apply_gradients(*a):
        calls[0] += 1
        if calls[0] == crash_at:
            raise KeyboardInterrupt
        apply_gradients(*a)

    monkeypatch.setattr(script, "apply_gradients", crashing_apply_gradients)
    with pytest.raises(KeyboardInterrupt):
        run_script(crashed)
    monkeypatch.undo()
    ckpt = torch.load(crashed / "checkpoint.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["epoch_step"]) == position

    run_script(crashed)
    once, resumed = (torch.load(d / "checkpoint.pth", weights_only=True) for d in (tmp_path / "once", crashed))
    assert once["epoch"] == resumed["epoch"] == 1 and "epoch_step" not in resumed
    for name in once["model"]:
        assert torch.equal(once["model"][name], resumed["model"][name]), name
    assert (tmp_path / "once" / "log.txt").read_text() == (crashed / "log.txt").read_text()


def test_when_mid_epoch_checkpoints_are_written(tmp_path):
    """Only when the interval has passed, never at an epoch's last step (its own checkpoint follows), never with 0;
    the position is counted within the epoch and the totals are gathered per process."""
    written = []

    def state(epoch, **position):
        written.append((epoch, position))
        return {"epoch": epoch, **position}

    for minutes, expected in ((0, []), (60, []), (1e-9, [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)])):
        written.clear()
        checkpoints = MidEpochCheckpoints(tmp_path / "checkpoint.pth", minutes, 4, state)
        for it in range(4, 10):
            checkpoints.save_if_due(it, {"loss": float(it)}, torch.device("cpu"))
        assert [(epoch, p["epoch_step"]) for epoch, p in written] == expected
    assert written[0][1]["epoch_totals"] == [{"loss": 4.0}]
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch_step"] == 2


def test_micro_batches_resume_at_the_step(tmp_path):
    """The resumed part of an epoch is the uninterrupted epoch's tail, numbered alike (brute force over steps)."""
    data = make_images(tmp_path / "data", 24, size=8)
    dataset = ImageDataset(data, v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32)]))
    loader = build_loader(dataset, 2, 0, seed=3)
    loader.sampler.set_epoch(5)
    full = [(it, first, last, x) for it, first, last, (x, _) in MicroBatches(loader, 3, 4, 5)]
    assert [it for it, *_ in full] == [15] * 4 + [16] * 4 + [17] * 4
    for start_step in range(3):
        loader.sampler.set_epoch(5)
        tail = [(it, first, last, x) for it, first, last, (x, _) in MicroBatches(loader, 3, 4, 5, start_step)]
        assert len(tail) == len(full) - 4 * start_step
        for a, b in zip(tail, full[4 * start_step:]):
            assert a[:3] == b[:3] and torch.equal(a[3], b[3])


@pytest.mark.parametrize("script_run, argv", [(run, TINY), (run_mae, MAE_TINY), (run_finetune, FINETUNE_TINY)],
                         ids=["dino", "mae", "finetune"])
def test_negative_interval_is_refused(script_run, argv, tmp_path, capsys):
    data = make_images(tmp_path / "data", 16)
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: script_run(argv + ["--checkpoint_every_minutes", "-1", "--data_path", str(data),
                                           "--output_dir", str(tmp_path / "out")]))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: --checkpoint_every_minutes") and "\n" not in err
