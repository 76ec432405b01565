"""The remembered sha256 of a merge's base (lorabox/io/digests.py): used when the file is unchanged, never when it
changed, and a cache that cannot be read or written changes nothing but the time."""
import hashlib
import json
import os

import numpy as np
import pytest

from lorabox.io import digests
from lorabox.io.safetensors import read_tensors, write_tensors
from lorabox.merge import engine
from lorabox.merge.engine import merge
from tests.helpers import random_lora
from tests.test_merge import flux_base, write_lora


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.setattr(digests, "CACHE_MIN_BYTES", 0)  # test files are small
    base = tmp_path / "base.safetensors"
    write_tensors(base, flux_base(np.random.default_rng(0), "BF16"))
    lora = write_lora(tmp_path / "l.safetensors", random_lora("flux1", every=4, text_encoders=False), "kohya")
    return base, lora


def _recorded(out) -> str:
    return json.loads(read_tensors(out)[1]["lorabox.merge"])["base"]["sha256"]


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


class _NoHashing:
    @staticmethod
    def sha256(*a):
        raise AssertionError("the base was hashed again")


def test_a_base_merged_again_is_not_hashed_again(files, tmp_path, monkeypatch):
    base, lora = files
    merge(base, [(lora, 0.8)], tmp_path / "a.safetensors")
    assert _recorded(tmp_path / "a.safetensors") == _sha256(base)
    assert digests.known(os.stat(base)) == _sha256(base)
    monkeypatch.setattr(digests, "hashlib", _NoHashing)
    merge(base, [(lora, 0.5)], tmp_path / "b.safetensors")
    assert _recorded(tmp_path / "b.safetensors") == _sha256(base)


def test_a_changed_base_is_hashed_again_even_with_its_old_size_and_mtime(files, tmp_path):
    base, lora = files
    merge(base, [(lora, 0.8)], tmp_path / "a.safetensors")
    old, st = _sha256(base), os.stat(base)
    data = bytearray(base.read_bytes())
    data[-1] ^= 1  # a bit of the last tensor
    with open(base, "r+b") as f:  # in place: same inode, same size
        f.write(data)
    os.utime(base, ns=(st.st_atime_ns, st.st_mtime_ns))  # the mtime set back; the ctime cannot be
    assert digests.known(os.stat(base)) is None
    merge(base, [(lora, 0.8)], tmp_path / "b.safetensors")
    assert _recorded(tmp_path / "b.safetensors") == _sha256(base) != old


def test_a_broken_or_unwritable_cache_changes_nothing_but_the_time(files, tmp_path, monkeypatch):
    base, lora = files
    cache = digests.cache_file()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("{not json")
    merge(base, [(lora, 0.8)], tmp_path / "a.safetensors")
    assert _recorded(tmp_path / "a.safetensors") == _sha256(base)
    assert json.loads(cache.read_text())["version"] == digests.VERSION  # written afresh
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LORABOX_CACHE_DIR", str(tmp_path / "file" / "cache"))  # cannot be created
    merge(base, [(lora, 0.8)], tmp_path / "b.safetensors")
    assert _recorded(tmp_path / "b.safetensors") == _sha256(base)
    monkeypatch.setenv("LORABOX_CACHE_DIR", "")  # off
    assert digests.cache_file() is None
    merge(base, [(lora, 0.8)], tmp_path / "c.safetensors")
    assert _recorded(tmp_path / "c.safetensors") == _sha256(base) and digests.known(os.stat(base)) is None


def test_small_files_and_files_changed_while_hashed_are_not_remembered(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(1000))
    assert digests.file_sha256(path) == _sha256(path) and not digests.cache_file().exists()  # under 64 MiB
    monkeypatch.setattr(digests, "CACHE_MIN_BYTES", 0)
    before = os.stat(path)
    path.write_bytes(os.urandom(1000))
    digests.remember(path, "0" * 64, before, os.stat(path))
    assert digests.known(os.stat(path)) is None
    assert digests.file_sha256(path) == _sha256(path) == digests.known(os.stat(path))


def test_unhashed_bases_are_read_ahead_of_the_compute(files, tmp_path, monkeypatch):
    """The hash reads each tensor's pages on the read-ahead thread; with the digest remembered, `_touch` must,
    or the compute threads wait on the disk in page faults. Either way the output is the same."""
    base, lora = files
    touched = []
    real = engine._touch
    monkeypatch.setattr(engine, "_touch", lambda view: (touched.append(len(view)), real(view)))
    merge(base, [(lora, 0.8)], tmp_path / "a.safetensors")
    assert touched == []  # hashed: the hash reads every page
    merge(base, [(lora, 0.8)], tmp_path / "b.safetensors")
    n = len(read_tensors(base)[0])
    assert len(touched) == n and sum(touched) >= os.path.getsize(base) - 8 - 65536
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def _recorded_gguf(out) -> str:
    from lorabox.io.gguf import open_gguf

    with open_gguf(out) as g:
        return json.loads(g.kv["lorabox.merge"])["base"]["sha256"]


@pytest.mark.parametrize("kind", ["quant", "gguf base"])
def test_gguf_merges_hash_the_base_while_reading_it(tmp_path, monkeypatch, kind):
    """The base's sha256 is taken on the reading thread and filled into the GGUF header at the end: every byte,
    the header and the text encoders' tensors the GGUF output leaves out included; the next merge remembers it."""
    from lorabox.tensor import Tensor
    from tests.test_merge_gguf import _gguf_base, _lora

    monkeypatch.setattr(digests, "CACHE_MIN_BYTES", 0)
    monkeypatch.setattr("lorabox.merge.gguf_merge.HASH_STEP", 1000)  # skipped ranges read in several pieces
    rng = np.random.default_rng(1)
    if kind == "quant":
        base = tmp_path / "base.safetensors"
        tensors = {"model.diffusion_model." + k: v for k, v in flux_base(rng, "BF16", n_in=256).items()}
        tensors.update({f"text_encoders.clip_l.w{i}": Tensor.from_values(rng.standard_normal((8, 300)), "F16")
                        for i in range(3)})  # sorted around the denoiser
        tensors["a_first.weight"] = Tensor.from_values(rng.standard_normal(5000), "F32")
        write_tensors(base, tensors)
        kw = dict(quant="Q8_0")
    else:
        base = tmp_path / "base.gguf"
        _gguf_base(base, rng, "Q4_0")
        kw = {}
    _, lora = _lora(tmp_path)
    merge(base, [(lora, 0.8)], tmp_path / "a.gguf", **kw)
    assert _recorded_gguf(tmp_path / "a.gguf") == _sha256(base)
    assert digests.known(os.stat(base)) == _sha256(base)
    monkeypatch.setattr(digests, "hashlib", _NoHashing)
    merge(base, [(lora, 0.5)], tmp_path / "b.gguf", **kw)
    assert _recorded_gguf(tmp_path / "b.gguf") == _sha256(base)


def test_a_file_read_out_of_order_is_hashed_at_the_end(tmp_path, monkeypatch):
    monkeypatch.setattr(digests, "CACHE_MIN_BYTES", 0)
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 1000)
    fd = os.open(path, os.O_RDONLY)
    try:
        digest = digests.WhileReading(path, fd, in_order=False)
        assert digest.hasher is None
        assert digest.finish() == _sha256(path) == digests.known(os.stat(path))
        assert digests.WhileReading(path, fd).hasher is None  # remembered now
    finally:
        os.close(fd)
