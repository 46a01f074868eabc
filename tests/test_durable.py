"""msgrelay/durable.py: what is written durably reads back whole."""

from __future__ import annotations

import os

import pytest

from msgrelay.durable import create_durably, read_whole


@pytest.mark.parametrize("size", [0, 1, 3000, 65535, 65536, 65537, 131072, 2_500_000])
def test_read_whole_returns_every_byte(tmp_path, size):
    data = os.urandom(size)
    path = tmp_path / "f"
    create_durably(path, data)
    assert read_whole(path) == data


def test_read_whole_of_a_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_whole(tmp_path / "absent")


def test_read_whole_closes_what_it_opens(tmp_path):
    path = tmp_path / "f"
    create_durably(path, b"x" * 70000)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        read_whole(path)
    assert len(os.listdir("/proc/self/fd")) == before
