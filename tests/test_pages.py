"""liftedge.pages: clean pages of a private file map are dropped, values never change."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from liftedge.pages import release_clean_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/pagemap")

N = 1 << 20  # 4 MiB of float32: 1024 pages


@pytest.fixture
def mapped(tmp_path) -> torch.Tensor:
    """A float32 tensor on a private (copy-on-write) map of a file, as transformers loads safetensors."""
    path = tmp_path / "weights.bin"
    np.arange(N, dtype=np.float32).tofile(path)
    return torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c"))


def test_read_pages_are_dropped_and_read_back_unchanged(mapped):
    expected = torch.arange(N, dtype=torch.float32)
    assert torch.equal(mapped, expected)  # every page is now resident
    assert release_clean_pages([mapped]) == 4 * N
    assert release_clean_pages([mapped]) == 0  # nothing resident is left
    assert torch.equal(mapped, expected)


def test_written_pages_are_kept(mapped):
    mapped.sum()  # read every page
    mapped[5000] = -1.0  # copy on write: this page is private memory now
    # (The write may also unmap clean neighbours, e.g. a huge page it split: fewer drops.)
    assert release_clean_pages([mapped]) <= 4 * N - 4096
    assert float(mapped[5000]) == -1.0 and float(mapped[5001]) == 5001.0
    assert release_clean_pages([mapped]) == 0  # the written page stays
    assert float(mapped[5000]) == -1.0


def test_heap_memory_is_never_dropped():
    t = torch.arange(N, dtype=torch.float32)
    assert release_clean_pages([t, t[10:], torch.empty(0)]) == 0
    assert torch.equal(t, torch.arange(N, dtype=torch.float32))


def test_partial_pages_at_a_tensors_ends_are_kept(mapped):
    mapped.sum()
    inner = mapped[100:N - 100]  # starts and ends inside a page shared with its neighbours
    assert release_clean_pages([inner]) == 4 * N - 2 * 4096
