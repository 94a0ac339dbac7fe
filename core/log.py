"""Console messages on the main process only, and the JSON-lines run log that DINO and MAE write."""
import json
import logging
import math
import sys
import time

import torch
from tqdm import tqdm

from core.distributed import all_reduce_sum, get_world_size, is_main_process
from core.errors import UserError


def setup_logger(name="dinossl"):
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
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


class Progress:
    """The epoch's progress bar (main process only) showing the throughput of the last optimizer step."""

    def __init__(self, total, epoch, batch_per_process):
        self.bar = tqdm(total=total, desc=f"epoch {epoch}", disable=not is_main_process(), leave=False,
                        dynamic_ncols=True, file=sys.stdout)
        self.samples = batch_per_process * get_world_size()
        self.last = time.perf_counter()

    def step(self, **postfix):
        now = time.perf_counter()
        self.bar.update(1)
        self.bar.set_postfix(**postfix, img_s=f"{self.samples / (now - self.last):.1f}")
        self.last = now

    def close(self):
        self.bar.close()


def check_finite(loss_value, it, epoch, ckpt_path, fix):
    """Stop before a non-finite loss reaches the weights; nothing is saved, so the last checkpoint stays good."""
    if not math.isfinite(loss_value):
        raise UserError(f"loss is {loss_value} at iteration {it} (epoch {epoch}): stopped; the last good "
                        f"checkpoint {ckpt_path} is intact. {fix}")
