"""Console messages on the main process only, and the JSON-lines run log that DINO and MAE write."""
import json
import logging
import sys

from core.distributed import is_main_process


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
