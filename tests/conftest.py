import os
from pathlib import Path

import pytest
import torch

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
