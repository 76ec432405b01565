"""A merge hands a LoRA's mapped pages back once their weight is merged (`io.safetensors.release`): resident memory
drops, the values read afterwards are the file's, and the output is the same."""
import re
from collections import Counter
import sys

import numpy as np
import pytest

from lorabox.conversion import load_lora
from lorabox.io.safetensors import read_tensors, release, write_tensors
from lorabox.merge import engine
from lorabox.merge.engine import merge
from lorabox.tensor import Tensor
from tests.helpers import random_lora
from tests.test_merge import flux_base, write_lora


def rss_file_kb() -> int:
    return int(re.search(r"RssFile:\s+(\d+)", open("/proc/self/status").read()).group(1))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_released_pages_leave_resident_memory_and_read_back_the_same(tmp_path):
    values = np.random.default_rng(0).standard_normal(4 << 20).astype(np.float32)  # 16 MB
    write_tensors(tmp_path / "f.safetensors", {"a": Tensor(values, "F32"), "b": Tensor(values[:3], "F32")})
    tensors, _ = read_tensors(tmp_path / "f.safetensors")
    a = tensors["a"].array.reshape(1024, -1)[::2]  # a view of a view of the map
    assert np.array_equal(tensors["a"].array, values)  # every page touched
    before = rss_file_kb()
    release([a, np.ones(4)])  # an array that is not mapped is left alone
    assert before - rss_file_kb() > 15 << 10
    assert np.array_equal(tensors["a"].array, values) and np.array_equal(tensors["b"].array, values[:3])


def test_a_merge_releases_each_merged_adapter_and_writes_the_same_file(tmp_path, monkeypatch):
    write_tensors(tmp_path / "base.safetensors", flux_base(np.random.default_rng(17)))
    lora = write_lora(tmp_path / "l.safetensors", random_lora("flux1", seed=18, every=2, text_encoders=False), "kohya")
    monkeypatch.setattr(engine, "release", lambda arrays: None)
    merge(tmp_path / "base.safetensors", [(lora, 0.7)], tmp_path / "kept.safetensors")
    released = []
    monkeypatch.setattr(engine, "release", lambda arrays: release(released.extend(arrays) or released))
    merge(tmp_path / "base.safetensors", [(lora, 0.7)], tmp_path / "released.safetensors")
    factors = Counter(t.array.nbytes for a in load_lora(lora).adapters.values() for t in a.tensors.values())
    assert factors and not factors - Counter(a.nbytes for a in released)  # every factor (and alpha), at least once
    assert (tmp_path / "kept.safetensors").read_bytes() == (tmp_path / "released.safetensors").read_bytes()


@pytest.mark.parametrize("to_gguf", [False, True])
def test_gguf_merges_release_each_merged_adapter(tmp_path, monkeypatch, to_gguf):
    """Into a GGUF base (keeping its types), and from safetensors to GGUF (--quant): the same hand-back."""
    from lorabox.merge import gguf_merge
    from tests.test_merge_gguf import _gguf_base, _lora

    rng = np.random.default_rng(19)
    if to_gguf:
        base = flux_base(rng, "BF16", n_in=256)
        write_tensors(tmp_path / "base.safetensors", {"model.diffusion_model." + k: v for k, v in base.items()})
        base_path, kw = tmp_path / "base.safetensors", {"quant": "Q8_0"}
    else:
        _gguf_base(tmp_path / "base.gguf", rng)
        base_path, kw = tmp_path / "base.gguf", {}
    _, lora = _lora(tmp_path)
    released = []
    monkeypatch.setattr(gguf_merge, "release", lambda arrays: release(released.extend(arrays) or released))
    report = merge(base_path, [(lora, 0.7)], tmp_path / "out.gguf", **kw)
    factors = Counter(t.array.nbytes for a in load_lora(lora).adapters.values() for t in a.tensors.values())
    assert report.merged and factors and not factors - Counter(a.nbytes for a in released)
