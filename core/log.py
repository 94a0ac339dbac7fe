"""Console messages on the main process only, the JSON-lines run log that DINO and MAE write, and optional
TensorBoard scalars."""
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from core.distributed import all_reduce_sum, get_world_size, is_main_process
from core.errors import UserError


class StdoutHandler(logging.StreamHandler):
    """Writes to sys.stdout as it is at each message, not as it was when the logger was made: pytest, notebooks
    and tqdm's redirection swap it, and a handler holding a closed stream would fail."""

    def emit(self, record):
        self.stream = sys.stdout
        super().emit(record)


def setup_logger(name="dinossl"):
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = StdoutHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if is_main_process() else logging.WARNING)
    return logger


def append_json_line(path, record):
    """One JSON object per line; appended and flushed so that a crash keeps every finished epoch."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def epoch_totals(total_loss, n_loss, n_bad, device, epoch):
    """(mean loss, skipped images) over every process; skipped undecodable images are reported, never hidden."""
    stats = torch.tensor([total_loss, n_loss, n_bad], dtype=torch.float64, device=device)
    total_loss, n_loss, n_bad = all_reduce_sum(stats).tolist()
    if n_bad:
        setup_logger().warning(f"epoch {epoch}: skipped {int(n_bad)} image(s) that could not be decoded")
    return total_loss / max(n_loss, 1), int(n_bad)


class TensorBoard:
    """Scalars for TensorBoard in --log_dir, written by the main process only; without a log_dir it does nothing.

    tensorboard is optional, so log.txt stays the record that needs nothing installed. Every process knows whether
    it is on, so that all of them join the loss average the original logs.
    """

    def __init__(self, log_dir):
        self.on, self.writer = log_dir is not None, None
        if not self.on:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise UserError("--log_dir needs the tensorboard package: pip install tensorboard, or leave out "
                            "--log_dir (log.txt has the same numbers)") from e
        try:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=log_dir, prefix=".write_test."):
                pass
        except OSError as e:
            raise UserError(f"--log_dir {log_dir} is not writable ({e.strerror}): choose another folder") from e
        if is_main_process():
            self.writer = SummaryWriter(log_dir=str(log_dir))

    def mean(self, value, device):
        """A per-process number averaged over the processes (only when on, as it costs a collective)."""
        if not self.on or get_world_size() == 1:
            return value
        return all_reduce_sum(torch.tensor([value], dtype=torch.float64, device=device)).item() / get_world_size()

    def add(self, step, scalars):
        """scalars: {tag: number}, nested dicts giving tags joined by '/' (an evaluation's results as they are);
        None values are left out."""
        if self.writer is None:
            return
        for tag, value in scalars.items():
            if isinstance(value, dict):
                self.add(step, {f"{tag}/{k}": v for k, v in value.items()})
            elif value is not None:
                self.writer.add_scalar(tag, value, step)

    def flush(self):
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


def add_log_dir_arg(parser, scalars):
    """--log_dir of the evaluations, whose scores go to TensorBoard once, at step 0."""
    parser.add_argument("--log_dir", default=None, type=str,
                        help=f"Also write {scalars} as TensorBoard scalars here (needs the tensorboard package).")


def epoch_1000x(it, steps_per_epoch, accum_iter=1):
    """MAE's TensorBoard x-axis, thousandths of an epoch (so runs of different batch sizes line up), for optimizer
    step `it` counted from the start: the original takes the index of the step's last micro-batch."""
    epoch, step = divmod(it, steps_per_epoch)
    data_iter_step = (step + 1) * accum_iter - 1
    return int((data_iter_step / (steps_per_epoch * accum_iter) + epoch) * 1000)


class Progress:
    """The epoch's progress bar (main process only) showing the throughput of the last optimizer step."""

    def __init__(self, total, epoch, batch_per_process):
        self.bar = tqdm(total=total, desc=f"epoch {epoch}", disable=not is_main_process(), leave=False,
                        dynamic_ncols=True, file=sys.stdout)
        self.samples = batch_per_process * get_world_size()
        self.last = time.perf_counter()

    def step(self, **postfix):
        """Advance the bar; returns the images per second of the step (all processes together)."""
        now = time.perf_counter()
        images_per_s = self.samples / (now - self.last)
        self.bar.update(1)
        self.bar.set_postfix(**postfix, img_s=f"{images_per_s:.1f}")
        self.last = now
        return images_per_s

    def close(self):
        self.bar.close()


def check_finite(loss_value, it, epoch, ckpt_path, fix):
    """Stop at a non-finite loss before any checkpoint holds it: nothing more is saved, so the last one written
    (if any) stays good."""
    if not math.isfinite(loss_value):
        kept = (f"the last good checkpoint {ckpt_path} is intact" if Path(ckpt_path).is_file()
                else "no checkpoint had been written yet")
        raise UserError(f"loss is {loss_value} at iteration {it} (epoch {epoch}): stopped; {kept}. {fix}")


class LossWatch:
    """The epoch's losses, kept on the device and read back in one transfer when asked (every --log_every steps
    and at the end of the epoch), so that the training step never waits for the device. A non-finite loss stops
    the run at the next read, naming its iteration, before the epoch's checkpoint could be written."""

    def __init__(self, epoch, ckpt_path, fix):
        self.epoch, self.ckpt_path, self.fix = epoch, ckpt_path, fix
        self.pending = []
        self.total, self.count, self.last = 0.0, 0, None

    def add(self, it, loss):
        self.pending.append((it, loss.detach().float()))

    def read(self):
        """Check and sum the losses since the last read; returns their mean (the last one if none is new)."""
        if not self.pending:
            return self.last
        values = torch.stack([loss for _, loss in self.pending]).tolist()
        for (it, _), value in zip(self.pending, values):
            check_finite(value, it, self.epoch, self.ckpt_path, self.fix)
        self.pending = []
        self.total += sum(values)
        self.count += len(values)
        self.last = sum(values) / len(values)
        return self.last
