"""Writes around the page cache (lorabox/io/direct.py): the same bytes as buffered writes, whatever the staging size;
a disk error on the write thread reaches the caller and leaves no file; filesystems that refuse O_DIRECT get
buffered writes."""
import errno
import fcntl
import os

import numpy as np
import pytest

from lorabox.io import direct
from lorabox.io.safetensors import StreamWriter, read_tensors, write_tensors
from lorabox.merge.engine import merge
from lorabox.tensor import Tensor
from tests.helpers import random_lora
from tests.test_merge import flux_base, write_lora

STAGE = 2 * direct.ALIGN  # many stages, and tensors that straddle them


def entries(seed=0, count=40):
    rng = np.random.default_rng(seed)
    shapes = [(int(rng.integers(1, 3000)),) for _ in range(count)]
    tensors = {f"t{i}": Tensor(rng.standard_normal(s).astype(np.float32), "F32") for i, s in enumerate(shapes)}
    return [(name, "F32", t.shape) for name, t in tensors.items()], tensors


def write(path, ents, tensors, *, direct_io: bool, monkeypatch):
    monkeypatch.setattr(StreamWriter, "DIRECT_MIN", 0 if direct_io else 1 << 62)
    monkeypatch.setattr(StreamWriter, "STAGE", STAGE)
    with StreamWriter(path, ents, {"digest": "?" * 16}) as w:
        used = w._direct is not None
        for name, _, _ in ents:
            w.write(name, tensors[name])
        w.fill("?" * 16, "0123456789abcdef")
    return used


@pytest.mark.parametrize("depth", [1, 3])
def test_direct_and_buffered_writes_give_the_same_file(tmp_path, monkeypatch, depth):
    monkeypatch.setattr(direct, "DEPTH", depth)  # writes in flight at once
    ents, tensors = entries()
    assert write(tmp_path / "direct.safetensors", ents, tensors, direct_io=True, monkeypatch=monkeypatch)
    assert not write(tmp_path / "buffered.safetensors", ents, tensors, direct_io=False, monkeypatch=monkeypatch)
    raw = (tmp_path / "direct.safetensors").read_bytes()
    assert raw == (tmp_path / "buffered.safetensors").read_bytes()
    assert len(raw) % direct.ALIGN  # not a whole number of blocks: the padding was cut off
    back, meta = read_tensors(tmp_path / "direct.safetensors")
    assert meta == {"digest": "0123456789abcdef"}
    for name, t in tensors.items():
        np.testing.assert_array_equal(back[name].array, t.array)


def test_a_file_of_exactly_whole_stages(tmp_path):
    path = tmp_path / "f.bin"
    path.touch()
    f = direct.open_direct(path, STAGE)
    assert f is not None
    data = np.random.default_rng(1).integers(0, 256, 3 * STAGE, dtype=np.uint8)
    f.write(data[:100].data)
    f.write(data[100:].data)
    assert f.tell() == 3 * STAGE
    assert f.finish() == 3 * STAGE
    assert path.read_bytes() == data.tobytes()
    with pytest.raises(ValueError, match="multiple"):
        direct.DirectFile(-1, STAGE + 1)


def test_a_disk_error_on_the_write_thread_stops_the_writer_and_leaves_no_file(tmp_path, monkeypatch):
    ents, tensors = entries(seed=2)
    real, calls = direct._pwrite_all, []

    def pwrite_all(fd, buf, offset):
        calls.append(offset)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, buf, offset)

    monkeypatch.setattr(direct, "_pwrite_all", pwrite_all)
    with pytest.raises(OSError) as info:
        write(tmp_path / "o.safetensors", ents, tensors, direct_io=True, monkeypatch=monkeypatch)
    assert info.value.errno == errno.ENOSPC and 3 <= len(calls) <= 3 + direct.DEPTH  # at most DEPTH more in flight
    assert list(tmp_path.iterdir()) == []


def test_a_filesystem_that_refuses_direct_writes_gets_buffered_ones(tmp_path, monkeypatch):
    real = os.pwrite

    def pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")  # as tmpfs before Linux 6.6 answers O_DIRECT
        return real(fd, data, offset)

    monkeypatch.setattr(direct.os, "pwrite", pwrite)
    ents, tensors = entries(seed=3, count=5)
    assert not write(tmp_path / "o.safetensors", ents, tensors, direct_io=True, monkeypatch=monkeypatch)
    back, _ = read_tensors(tmp_path / "o.safetensors")
    for name, t in tensors.items():
        np.testing.assert_array_equal(back[name].array, t.array)


def test_a_merge_written_around_the_page_cache_is_the_same_file(tmp_path, monkeypatch):
    """Large merges write with O_DIRECT (small ones are buffered): the bytes, the record and its digest agree."""
    write_tensors(tmp_path / "base.safetensors", flux_base(np.random.default_rng(9)))
    lora = write_lora(tmp_path / "l.safetensors", random_lora("flux1", seed=10, every=2, text_encoders=False), "kohya")
    merge(tmp_path / "base.safetensors", [(lora, 0.8)], tmp_path / "buffered.safetensors")
    monkeypatch.setattr(StreamWriter, "DIRECT_MIN", 0)
    monkeypatch.setattr(StreamWriter, "STAGE", STAGE)
    opened = []
    real_open = direct.open_direct
    monkeypatch.setattr("lorabox.io.safetensors.open_direct", lambda *a: opened.append(real_open(*a)) or opened[-1])
    merge(tmp_path / "base.safetensors", [(lora, 0.8)], tmp_path / "direct.safetensors")
    assert opened and opened[0] is not None
    assert (tmp_path / "direct.safetensors").read_bytes() == (tmp_path / "buffered.safetensors").read_bytes()


def test_lorabox_direct_io_0_turns_direct_writes_off(tmp_path, monkeypatch):
    ents, tensors = entries(seed=4, count=3)
    monkeypatch.setenv("LORABOX_DIRECT_IO", "0")
    assert not write(tmp_path / "off.safetensors", ents, tensors, direct_io=True, monkeypatch=monkeypatch)
    monkeypatch.setenv("LORABOX_DIRECT_IO", "1")
    assert write(tmp_path / "on.safetensors", ents, tensors, direct_io=True, monkeypatch=monkeypatch)
    assert (tmp_path / "off.safetensors").read_bytes() == (tmp_path / "on.safetensors").read_bytes()


def test_a_disk_error_while_opening_leaves_no_file(tmp_path, monkeypatch):
    def refuse(*_):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr("lorabox.io.safetensors.open_direct", refuse)
    ents, tensors = entries(seed=5, count=2)
    with pytest.raises(OSError):
        write(tmp_path / "o.safetensors", ents, tensors, direct_io=True, monkeypatch=monkeypatch)
    assert list(tmp_path.iterdir()) == []
