"""Console messages on the main process only, and the JSON-lines run log that DINO and MAE write."""
import json
import logging
import sys

import torch

from core.distributed import all_reduce_sum, is_main_process


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
