"""What the fine-tuning tests share: the device they train on, the CLI runner, one torch thread."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator

import pytest

from tests import helpers

# The main training runs on the CPU; BATCHCAP_TEST_DEVICE=cuda runs them on a GPU instead (autocast, gradient
# scaler, gradient checkpointing paths), e.g. on a GPU machine: BATCHCAP_TEST_DEVICE=cuda pytest tests/test_train_*
TRAIN_DEVICE = os.environ.get("BATCHCAP_TEST_DEVICE", "cpu")


def run_cli(*args: object) -> tuple[int, str]:
    return helpers.run_cli(*args, raise_errors=True)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread, above all on a CPU other jobs share."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_manifest(path: str, rows: list[dict]) -> str:
    """``rows`` as a CSV manifest at ``path`` (columns: every key, in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    return path
