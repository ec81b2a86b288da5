"""Atomic output (qdpo_ray/io.py): files appear whole or not at all, with the mode the umask gives."""

import os
import stat

import pytest
import torch

from qdpo_ray import io


@pytest.fixture(params=[0o022, 0o027])
def mask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_umask_is_read_without_changing_it(mask):
    assert io.umask() == mask
    assert io.umask() == mask


def test_atomic_files_get_the_umask_mode(tmp_path, mask):
    io.atomic_write_text(tmp_path / "a.txt", "x")
    io.atomic_write_json(tmp_path / "b.json", {"a": 1})
    with io.atomic_path(tmp_path / "c.bin") as tmp:
        tmp.write_bytes(b"\0")
    for name in ("a.txt", "b.json", "c.bin"):
        assert _mode(tmp_path / name) == 0o666 & ~mask, name
    assert {0o022: 0o644, 0o027: 0o640}[mask] == _mode(tmp_path / "a.txt")


def test_atomic_dir_gets_the_umask_mode(tmp_path, mask):
    from safetensors.torch import save_file

    with io.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("x")
        (tmp / "sub").mkdir(mode=0o700)
        save_file({"w": torch.zeros(2)}, str(tmp / "sub" / "model.safetensors"))  # safetensors writes 0600
    assert _mode(tmp_path / "d" / "sub" / "model.safetensors") == 0o666 & ~mask
    assert _mode(tmp_path / "d" / "sub") == 0o777 & ~mask
    assert _mode(tmp_path / "d") == {0o022: 0o755, 0o027: 0o750}[mask]
    assert (tmp_path / "d" / "f").read_text() == "x"


def test_failed_atomic_path_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with io.atomic_path(tmp_path / "out.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_failed_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    io.atomic_write_text(target, "old")

    def full_disk(*a):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", full_disk)
    with pytest.raises(OSError, match="disk full"):
        io.atomic_write_text(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_failed_atomic_dir_keeps_the_old_dir(tmp_path):
    with io.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("old")
    with pytest.raises(RuntimeError):
        with io.atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("new")
            raise RuntimeError
    assert (tmp_path / "d" / "f").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["d"]
