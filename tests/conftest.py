import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import run_cli

# One thread: the tiny models of the tests gain nothing from more, and data workers need the other core.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SHARED_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture
def shared_data():
    """The real data folder (../shared/data or $SHARED_DATA_DIR); tests that need it skip with the reason."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set SHARED_DATA_DIR)")
    return SHARED_DATA


def read_scalars(log_dir):
    """{tag: [(step, value), ...]} from the TensorBoard event files in log_dir (skips when tensorboard is absent)."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def make_images(folder, n, size=40, seed=0):
    """n random RGB images in two class folders, a/ and b/."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = folder / "ab"[i % 2]
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(sub / f"{i:03d}.png")
    return folder


def one_line_error(call, capsys):
    """Run an entry point's main as the command line does; it must stop with exit status 2 and exactly one line,
    `error: ...`, which is returned."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(call)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]
