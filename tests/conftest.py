"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from .daemon_harness import Daemon


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: with other test processes on the 2 cores, OpenMP thread hand-offs cost
    10x more than the arithmetic (measured), so modules that use this run single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Daemons for one test: make(root=None, name=None, **config overrides) -> Daemon (not
    started; `root` defaults to tmp_path / name, `name` to d1, d2, ...). Every daemon made is
    killed when the test ends, however it ended: a leaked daemon would outlive the test run."""
    created: list[Daemon] = []

    def make(root: Path | None = None, name: str | None = None, **overrides) -> Daemon:
        name = name or f"d{len(created) + 1}"
        d = Daemon(tmp_path / name if root is None else root, name=name, **overrides)
        created.append(d)
        return d

    yield make
    for d in created:
        d.kill()
