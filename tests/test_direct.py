"""Reads and writes around the page cache (lorabox/io/direct.py). Writes: the same bytes as buffered writes,
whatever the staging size; a disk error on the write thread reaches the caller and leaves no file; filesystems that
refuse O_DIRECT get buffered writes. Reads: any byte range, and merges whose output and recorded digest are those of
memory-mapped reads, whatever the read sizes, gaps or trailing bytes in the base."""
import errno
import fcntl
import hashlib
import json
import mmap
import os
import struct

import numpy as np
import pytest

from lorabox.errors import InputFileError
from lorabox.io import digests, direct
from lorabox.io.safetensors import StreamWriter, read_header, read_tensors, write_tensors
from lorabox.merge import engine
from lorabox.merge.engine import merge
from lorabox.parallel import BufferPool
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
    monkeypatch.setattr(direct, "DIRECT_MIN", 0 if direct_io else 1 << 62)
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
    monkeypatch.setattr(direct, "DIRECT_MIN", 0)
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


# -- reads ---------------------------------------------------------------------------------------------------------
def read_directly(monkeypatch, page_cache=False):
    """Bases read around the page cache. The test files were just written, so the page cache holds them whole:
    unless `page_cache`, nothing is copied from there (`direct.Residency`), and every byte is read with O_DIRECT."""
    monkeypatch.setenv("LORABOX_DIRECT_READS", "1")
    monkeypatch.setattr(direct, "DIRECT_MIN", 0)
    monkeypatch.setattr(direct, "CACHE_SHARE", 0)  # test files are far smaller than the RAM
    if not page_cache:
        monkeypatch.setattr(direct.Residency, "of", classmethod(lambda cls, path: None))


def test_only_files_the_page_cache_cannot_keep_are_read_directly(monkeypatch):
    monkeypatch.setattr(direct, "_ram", lambda: 24 << 30)
    monkeypatch.delenv("LORABOX_DIRECT_READS", raising=False)
    monkeypatch.delenv("LORABOX_DIRECT_IO", raising=False)
    assert not direct.wanted_for_reading(5 << 30)  # an SDXL base: the next merge finds it in memory
    assert direct.wanted_for_reading(23 << 30)  # FLUX.1: more than half the RAM
    monkeypatch.setenv("LORABOX_DIRECT_READS", "0")
    assert not direct.wanted_for_reading(23 << 30)  # through the page cache when asked
    monkeypatch.setenv("LORABOX_DIRECT_READS", "1")
    monkeypatch.setenv("LORABOX_DIRECT_IO", "0")
    assert not direct.wanted_for_reading(23 << 30)


def test_the_reader_returns_any_byte_range_and_refuses_one_past_the_end(tmp_path):
    data = np.random.default_rng(6).integers(0, 256, 3 * direct.ALIGN + 123, dtype=np.uint8)
    path = tmp_path / "f.bin"
    path.write_bytes(data.tobytes())
    reader = direct.DirectReader(direct.open_read(path), BufferPool(small=0))
    ranges = [(0, 0), (0, 1), (5, 4101), (4096, 8192), (4095, 4097), (100, len(data)), (len(data), len(data))]
    futures = [reader.submit(a, b) for a, b in ranges]  # in flight together
    for (a, b), f in zip(ranges, futures):
        assert f.result().tobytes() == data[a:b].tobytes()
    with pytest.raises(EOFError):
        reader.submit(10, len(data) + 1).result()
    reader.close()


def test_the_reader_copies_what_the_page_cache_holds_and_reads_the_rest_directly(tmp_path):
    """A base partly in memory (left by a copy or a download) is read from there up to its first absent page, and from
    the disk past it; asking which pages are there reads none in, and nor do the direct reads. (Whole MiB: the page
    cache holds a file in folios of up to a few MiB, and drops only whole ones.)"""
    mib, page = 1 << 20, mmap.PAGESIZE
    data = np.random.default_rng(7).integers(0, 256, 16 * mib + 123, dtype=np.uint8)
    path = tmp_path / "f.bin"
    path.write_bytes(data.tobytes())
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)  # clean pages can be dropped
    os.posix_fadvise(fd, 4 * mib, 4 * mib, os.POSIX_FADV_DONTNEED)  # MiB 4-7 leave the cache
    os.close(fd)
    resident = direct.Residency.of(path)
    assert resident.prefix(0, 16 * mib) == 4 * mib
    assert resident.prefix(4 * mib, 4 * mib) == 0
    assert resident.prefix(8 * mib, 8 * mib + 123) == 8 * mib + page  # the last, partial page counts whole
    reader = direct.DirectReader(direct.open_read(path), BufferPool(small=0), resident=resident)
    assert reader.submit(5, len(data)).result().tobytes() == data[5:].tobytes()
    assert reader.from_cache == 4 * mib - 5  # MiB 0-3 (of the bytes asked for); the rest from the disk
    assert reader.submit(8 * mib + 7, len(data)).result().tobytes() == data[8 * mib + 7:].tobytes()
    assert reader.from_cache == 4 * mib - 5 + len(data) - (8 * mib + 7)  # all from the cache, to the file's end
    assert resident.prefix(4 * mib, 4 * mib) == 0  # still not in the cache
    with pytest.raises(EOFError):
        reader.submit(10, len(data) + 1).result()
    reader.close()


def test_the_pool_hands_out_aligned_buffers_and_reuses_free_ones():
    pool = BufferPool(keep=1 << 30, small=0)
    a = pool.aligned(10_000, direct.ALIGN)
    assert a.ctypes.data % direct.ALIGN == 0 and a.nbytes == 10_000
    address = a.ctypes.data
    view = a[100:200].view(np.uint16)
    del a
    other = pool.aligned(9_000, direct.ALIGN)
    assert other.ctypes.data != address  # a view still holds the first
    del view
    assert pool.aligned(9_000, direct.ALIGN).ctypes.data == address


def with_gaps(src, dst, gap: int, tail: bytes):
    """`src` re-laid with `gap` unused bytes before each tensor and `tail` after the last (safetensors readers
    accept both; the digest must cover them)."""
    header, metadata, start = read_header(src)
    raw = open(src, "rb").read()
    out, body = {"__metadata__": metadata} if metadata else {}, bytearray()
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        b, f = e["data_offsets"]
        body += bytes(range(gap))
        out[name] = dict(e, data_offsets=[len(body), len(body) + f - b])
        body += raw[start + b:start + f]
    head = json.dumps(out).encode()
    open(dst, "wb").write(struct.pack("<Q", len(head)) + head + bytes(body) + tail)


def _recorded(out) -> str:
    return json.loads(read_tensors(out)[1]["lorabox.merge"])["base"]["sha256"]


@pytest.mark.parametrize("run, ahead, gap, tail", [(1, 0, 0, b""), (3000, 1 << 20, 7, b"trailing bytes"),
                                                   (1 << 30, 1 << 30, 1, b"x")])
def test_a_merge_read_around_the_page_cache_is_the_same_file(tmp_path, monkeypatch, run, ahead, gap, tail):
    """Tensors grouped into reads of at least `run` bytes, `ahead` bytes of reads in flight: the output and the
    digest recorded (first hashed, then remembered) are those of memory-mapped reads."""
    monkeypatch.setattr(digests, "CACHE_MIN_BYTES", 0)
    write_tensors(tmp_path / "packed.safetensors", flux_base(np.random.default_rng(11)), {"note": "a base"})
    base = tmp_path / "base.safetensors"
    with_gaps(tmp_path / "packed.safetensors", base, gap, tail)
    lora = write_lora(tmp_path / "l.safetensors", random_lora("flux1", seed=12, every=2, text_encoders=False), "kohya")
    merge(base, [(lora, 0.8)], tmp_path / "mapped.safetensors")
    digests.cache_file().unlink()
    read_directly(monkeypatch)
    monkeypatch.setattr(direct, "RUN", run)
    monkeypatch.setattr(direct, "AHEAD", ahead)
    opened = []
    real_open = direct.open_read
    monkeypatch.setattr(direct, "open_read", lambda p: opened.append(real_open(p)) or opened[-1])
    touched = []
    monkeypatch.setattr(engine, "_touch", touched.append)
    merge(base, [(lora, 0.8)], tmp_path / "hashed.safetensors")
    merge(base, [(lora, 0.8)], tmp_path / "remembered.safetensors")
    assert len(opened) == 2 and None not in opened and not touched  # read directly: nothing mapped to touch
    want = (tmp_path / "mapped.safetensors").read_bytes()
    assert _recorded(tmp_path / "mapped.safetensors") == hashlib.sha256(base.read_bytes()).hexdigest()
    assert (tmp_path / "hashed.safetensors").read_bytes() == want
    assert (tmp_path / "remembered.safetensors").read_bytes() == want


def test_a_merge_copies_the_part_of_the_base_the_page_cache_holds(tmp_path, monkeypatch):
    """A base whose MiB 2-3 the page cache no longer holds: those are read from the disk, the rest copied from memory
    (the report says how much: all but those, give or take the run that meets them), and the output is the mapped
    merge's."""
    from tests.test_merge_gguf import _lora

    monkeypatch.setattr(digests, "CACHE_MIN_BYTES", 0)
    base = tmp_path / "base.safetensors"
    write_tensors(base, flux_base(np.random.default_rng(16), "BF16", n_in=1024))
    _, lora = _lora(tmp_path, n_in=1024)
    merge(base, [(lora, 0.8)], tmp_path / "mapped.safetensors")
    digests.cache_file().unlink()
    fd = os.open(base, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 2 << 20, 2 << 20, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    read_directly(monkeypatch, page_cache=True)
    monkeypatch.setattr(direct, "RUN", 1 << 16)
    report = merge(base, [(lora, 0.8)], tmp_path / "direct.safetensors")
    absent = base.stat().st_size - (2 << 20)
    assert absent - direct.RUN - direct.ALIGN <= report.base_from_page_cache <= absent + direct.ALIGN
    assert (tmp_path / "direct.safetensors").read_bytes() == (tmp_path / "mapped.safetensors").read_bytes()
    assert _recorded(tmp_path / "direct.safetensors") == hashlib.sha256(base.read_bytes()).hexdigest()


def test_the_gpu_path_merges_a_base_read_around_the_page_cache_as_the_cpu_path_does(tmp_path, monkeypatch):
    """TorchCompute (here on torch's CPU device) takes its weights from the reads' recycled buffers: the same file."""
    from lorabox.merge.compute import TorchCompute

    write_tensors(tmp_path / "base.safetensors", flux_base(np.random.default_rng(14)))
    lora = write_lora(tmp_path / "l.safetensors", random_lora("flux1", seed=15, every=2, text_encoders=False), "kohya")
    merge(tmp_path / "base.safetensors", [(lora, 0.8)], tmp_path / "mapped.safetensors")
    read_directly(monkeypatch)
    monkeypatch.setattr(direct, "RUN", 1 << 12)  # many reads, each buffer recycled while the stream goes on
    merge(tmp_path / "base.safetensors", [(lora, 0.8)], tmp_path / "direct.safetensors",
          compute=TorchCompute("cpu"))
    assert (tmp_path / "direct.safetensors").read_bytes() == (tmp_path / "mapped.safetensors").read_bytes()


def test_a_filesystem_that_refuses_direct_reads_gets_mapped_ones(tmp_path, monkeypatch):
    write_tensors(tmp_path / "base.safetensors", flux_base(np.random.default_rng(13)))
    lora = write_lora(tmp_path / "l.safetensors", random_lora("flux1", seed=14, every=3, text_encoders=False), "kohya")
    merge(tmp_path / "base.safetensors", [(lora, 1.0)], tmp_path / "a.safetensors")
    read_directly(monkeypatch)
    monkeypatch.setattr(direct, "open_direct", lambda *a: None)  # writes buffered: only reads are refused here

    def preadv(*_):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(direct.os, "preadv", preadv)
    assert direct.open_read(tmp_path / "base.safetensors") is None
    merge(tmp_path / "base.safetensors", [(lora, 1.0)], tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


@pytest.mark.parametrize("checked", [True, False])
def test_a_base_cut_short_while_merging_is_reported_and_leaves_no_file(tmp_path, monkeypatch, checked):
    """Cut after its header was read: found before reading (`checked`), or by the read that meets the end."""
    base = tmp_path / "base.safetensors"
    write_tensors(base, flux_base(np.random.default_rng(15)))
    lora = write_lora(tmp_path / "l.safetensors", random_lora("flux1", seed=16, every=2, text_encoders=False), "kohya")
    read_directly(monkeypatch)
    real_open = engine.open_base

    def open_then_cut(path):
        opened = real_open(path)
        os.truncate(base, os.path.getsize(base) - 1000)
        return opened

    monkeypatch.setattr(engine, "open_base", open_then_cut)
    if not checked:
        monkeypatch.setattr(engine, "_check_size", lambda *a: None)
    with pytest.raises(InputFileError, match="truncated"):
        merge(base, [(lora, 1.0)], tmp_path / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "l.safetensors"]


def test_tensors_that_share_bytes_are_refused(tmp_path):
    head = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                       "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode()
    (tmp_path / "f.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + bytes(12))
    with pytest.raises(InputFileError, match="'a' and 'b' share bytes"):
        read_header(tmp_path / "f.safetensors")


@pytest.mark.parametrize("run", [1, 3000, 1 << 30])
def test_gguf_merges_read_and_written_around_the_page_cache_are_the_same_files(tmp_path, monkeypatch, run):
    """GGUF outputs: `--quant` from a full checkpoint (its VAE and text encoder between denoiser tensors, which a
    merge with the digest remembered does not read) and a GGUF base keeping its types, read and written with
    O_DIRECT (hashed while read, then remembered), are byte for byte the files of buffered reads and writes."""
    from tests.test_merge_gguf import _gguf_base, _lora

    monkeypatch.setattr(digests, "CACHE_MIN_BYTES", 0)
    rng = np.random.default_rng(21)
    full = {}
    for i, (k, v) in enumerate(flux_base(rng, "BF16", n_in=256).items()):
        full["model.diffusion_model." + k] = v
        if i % 4 == 0:  # stretches the --quant output leaves out
            full[f"first_stage_model.decoder.block.{i}.weight"] = Tensor.zeros((96, 64), "F16")
    full["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = Tensor.zeros((7000,), "F32")
    write_tensors(tmp_path / "full.safetensors", full)
    _gguf_base(tmp_path / "base.gguf", rng, "Q5_0")
    _, lora = _lora(tmp_path)
    cases = [("quant", tmp_path / "full.safetensors", {"quant": "Q8_0"}), ("base", tmp_path / "base.gguf", {})]

    monkeypatch.setattr(direct, "DIRECT_MIN", 1 << 62)
    for name, base, kw in cases:
        merge(base, [(lora, 0.7)], tmp_path / f"{name}-buffered.gguf", **kw)
        assert _gguf_digest(tmp_path / f"{name}-buffered.gguf") == hashlib.sha256(base.read_bytes()).hexdigest()
    digests.cache_file().unlink()

    read_directly(monkeypatch)
    monkeypatch.setattr(direct, "RUN", run)
    monkeypatch.setattr(direct, "AHEAD", run)
    opened, written = [], []
    real_open, real_open_direct = direct.open_read, direct.open_direct
    monkeypatch.setattr(direct, "open_read", lambda p: opened.append(real_open(p)) or opened[-1])
    monkeypatch.setattr(direct, "open_direct", lambda *a: written.append(real_open_direct(*a)) or written[-1])
    ranges = []
    real_submit = direct.DirectReader.submit
    monkeypatch.setattr(direct.DirectReader, "submit",
                        lambda self, a, b: ranges.append(b - a) or real_submit(self, a, b))
    for name, base, kw in cases:
        want = (tmp_path / f"{name}-buffered.gguf").read_bytes()
        for again in ("hashed", "remembered"):
            ranges.clear()
            merge(base, [(lora, 0.7)], tmp_path / f"{name}-{again}.gguf", **kw)
            assert (tmp_path / f"{name}-{again}.gguf").read_bytes() == want, (name, again)
            if again == "hashed":  # every byte, once
                assert sum(ranges) == base.stat().st_size
            elif name == "quant" and run < 1 << 30:  # the VAE and text encoder stretches are not read
                assert sum(ranges) < base.stat().st_size - 7000 * 4
    assert len(opened) == len(written) == 4 and None not in opened + written


def _gguf_digest(path) -> str:
    from lorabox.io.gguf import open_gguf

    return json.loads(open_gguf(path).kv["lorabox.merge"])["base"]["sha256"]
