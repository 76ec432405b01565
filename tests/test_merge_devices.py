"""The GPU path's code (TorchCompute) gives the same bytes as the CPU path (NumpyCompute), run here on torch's CPU
device: CI has no GPU, so this is what keeps the two in step. On a machine with CUDA the same tests also run on
the GPU (`LORABOX_TEST_CUDA=1`)."""
import os

import numpy as np
import pytest
import torch

from lorabox.io.safetensors import read_tensors, write_tensors
from lorabox.lora import Adapter
from lorabox.merge.compute import NumpyCompute, TorchCompute, make_compute
from lorabox.merge.engine import merge
from lorabox.quant.gguf_quants import QTYPES
from lorabox.tensor import Tensor
from tests.helpers import rand, random_lora
from tests.test_merge import _scaled_base, flux_base, write_lora

DEVICES = ["cpu"] + (["cuda"] if os.environ.get("LORABOX_TEST_CUDA") and torch.cuda.is_available() else [])


def _loras(tmp_path):
    """Whole and sliced LoRAs, plus DoRA, LoHa and LoKr adapters and a conv-free diff: every kind of math."""
    a = random_lora("flux1", seed=1, every=3, alpha=3.0, text_encoders=False)
    b = random_lora("flux1", seed=2, every=2, alpha=4.0, slices=True, text_encoders=False)
    rng = np.random.default_rng(9)
    c = random_lora("flux1", seed=3, every=5, alpha=8.0, text_encoders=False)
    kinds = iter(["dora", "loha", "lokr", "diff"])
    for key, ad in list(c.adapters.items()):
        kind = next(kinds, None)
        if kind is None:
            break
        rows, n_in = ad.tensors["up"].shape[0], ad.tensors["down"].shape[1]
        if kind == "dora":
            ad.tensors["magnitude"] = Tensor.from_values(np.abs(rng.standard_normal(rows)) + 0.5, "F32")
        elif kind == "loha":
            c.adapters[key] = Adapter(ad.component, ad.module, None, {
                "hada_w1_a": rand(rng, (rows, 2)), "hada_w1_b": rand(rng, (2, n_in)),
                "hada_w2_a": rand(rng, (rows, 2)), "hada_w2_b": rand(rng, (2, n_in))}, Tensor.scalar(2.0))
        elif kind == "lokr":
            c.adapters[key] = Adapter(ad.component, ad.module, None, {
                "lokr_w1": rand(rng, (2, 2)), "lokr_w2": rand(rng, (rows // 2, n_in // 2))}, None)
        else:
            c.adapters[key] = Adapter(ad.component, ad.module, None, {"diff": rand(rng, (rows, n_in))}, None)
    return [(write_lora(tmp_path / "a.safetensors", a, "kohya"), 0.8),
            (write_lora(tmp_path / "b.safetensors", b, "diffusers"), -0.5),
            (write_lora(tmp_path / "c.safetensors", c, "comfyui"), 0.6)]


def _same_outputs(tmp_path, base_path, loras, device, **kw):
    """numpy kernels (the reference CPU path), torch's CPU kernels inside the CPU path (with and without the
    certified tiles, and as a merge decides for itself: `NumpyCompute.expect`), and TorchCompute."""
    merge(base_path, loras, tmp_path / "cpu.safetensors", compute=NumpyCompute(kernels="numpy"), **kw)
    want, want_meta = read_tensors(tmp_path / "cpu.safetensors")
    for name, compute in (("kernels", NumpyCompute(kernels="torch", certify=False)),
                          ("certified", NumpyCompute(kernels="torch")), ("auto", NumpyCompute()),
                          ("dev", TorchCompute(device))):
        report = merge(base_path, loras, tmp_path / f"{name}.safetensors", compute=compute, **kw)
        assert report.device == compute.name and report.merged > 0
        got, got_meta = read_tensors(tmp_path / f"{name}.safetensors")
        assert got.keys() == want.keys() and got_meta == want_meta
        changed = 0
        for k in want:
            assert got[k].dtype == want[k].dtype and got[k].bits_equal(want[k]), (name, k)
            changed += k.endswith(".weight")
        assert changed


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,rounding", [("keep", "nearest"), ("fp16", "nearest"), ("fp32", "nearest"),
                                            ("bf16", "nearest"),
                                            ("fp8_e4m3fn", "nearest"), ("fp8_e5m2", "nearest"),
                                            ("fp8_e4m3fn", "stochastic")])
@pytest.mark.parametrize("base_dtype", ["BF16", "F16"])
def test_torch_path_equals_numpy_path(tmp_path, device, dtype, rounding, base_dtype):
    base = flux_base(np.random.default_rng(0), base_dtype)
    big = base["double_blocks.0.img_mlp.0.weight"]
    base["double_blocks.0.img_mlp.0.weight"] = Tensor.from_values(big.values() * 0 + 6e4, base_dtype)  # fp8 saturates
    write_tensors(tmp_path / "base.safetensors", base)
    _same_outputs(tmp_path, tmp_path / "base.safetensors", _loras(tmp_path), device, dtype=dtype, rounding=rounding)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["legacy", "comfy_quant"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_torch_path_equals_numpy_path_on_a_scaled_fp8_base(tmp_path, device, layout, rounding):
    """Patched layers quantized again with their scales recomputed: on the device, amax, the float32 product and
    the rounding; the scale from the same host arithmetic."""
    write_tensors(tmp_path / "base.safetensors", _scaled_base(np.random.default_rng(1), layout))
    lora = write_lora(tmp_path / "l.safetensors", random_lora("flux1", every=3, text_encoders=False), "kohya")
    _same_outputs(tmp_path, tmp_path / "base.safetensors", [(lora, 0.7)], device, rounding=rounding)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["legacy", "comfy_quant"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_torch_path_equals_numpy_path_making_scaled_fp8(tmp_path, device, layout, rounding):
    """A plain bf16 base written as ComfyUI scaled fp8 (`--fp8-layout`), its patched matrices quantized on the device."""
    base = flux_base(np.random.default_rng(5), "BF16")
    write_tensors(tmp_path / "base.safetensors", base)
    _same_outputs(tmp_path, tmp_path / "base.safetensors", _loras(tmp_path), device, dtype="fp8_e4m3fn",
                  rounding=rounding, fp8_layout=layout)


def _same_files(tmp_path, base_path, loras, device, **kw):
    """GGUF outputs: byte for byte the same file from the numpy kernels, torch's CPU kernels and TorchCompute."""
    outs = []
    for name, compute in (("cpu", NumpyCompute(kernels="numpy")), ("kernels", NumpyCompute(kernels="torch")),
                          ("dev", TorchCompute(device))):
        report = merge(base_path, loras, tmp_path / f"{name}.gguf", compute=compute, **kw)
        assert report.device == compute.name and report.merged > 0
        outs.append((tmp_path / f"{name}.gguf").read_bytes())
    assert outs[0] == outs[1] == outs[2]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", QTYPES)
def test_torch_path_equals_numpy_path_writing_gguf(tmp_path, device, qtype):
    """`--quant`: patched weights merged and block-quantized on the device, untouched ones quantized there too."""
    from tests.test_merge_gguf import _lora

    base = flux_base(np.random.default_rng(6), "BF16", n_in=256)
    write_tensors(tmp_path / "base.safetensors", {"model.diffusion_model." + k: v for k, v in base.items()})
    _, lora = _lora(tmp_path)
    _same_files(tmp_path, tmp_path / "base.safetensors", [(lora, 0.8)], device, quant=qtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", QTYPES)
def test_torch_path_equals_numpy_path_on_a_gguf_base(tmp_path, device, qtype):
    """A GGUF base keeps its types: patched weights decoded, merged and quantized again on the device."""
    from tests.test_merge_gguf import _gguf_base, _lora

    _gguf_base(tmp_path / "base.gguf", np.random.default_rng(7), qtype)
    _, lora = _lora(tmp_path)
    _same_files(tmp_path, tmp_path / "base.gguf", [(lora, -0.6)], device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,rounding", [("BF16", "nearest"), ("F32", "nearest"), ("F64", "nearest"),
                                            ("F8_E4M3", "nearest"), ("F8_E5M2", "stochastic")])
def test_device_results_land_in_recycled_host_memory(device, dtype, rounding):
    """TorchCompute copies each merged weight into an array of the CPU path's buffer pool, and the next weight of
    that size reuses it once the first is written and dropped: a fresh host array's pages are each faulted in on
    first touch (about 1 GB/s on the H100 machine, a third of a FLUX.1 merge's time there)."""
    from types import SimpleNamespace

    from lorabox.merge.plan import Patch

    rng = np.random.default_rng(4)
    compute = TorchCompute(device)
    lora = Adapter("unet", "m", tensors={"down": rand(rng, (4, 1024)), "up": rand(rng, (2048, 4))})
    info = SimpleNamespace(name="double_blocks.0.img_mlp.0.weight")

    def merged():
        w = Tensor.from_values(rng.standard_normal((2048, 1024)) * 0.02, "BF16")  # 2 MB as fp8: pooled
        return compute.process(info, w, [Patch(lora, 0.8, None, 0)], dtype, rounding)

    with compute.session():
        first = merged()
        address = first.array.ctypes.data
        assert first.dtype == dtype and first.array.shape == (2048, 1024) and compute.cpu.buffers.holds(first.array)
        del first
        assert merged().array.ctypes.data == address


@pytest.mark.parametrize("tile_cols,block_bytes", [(None, None), (1000, 40_000)])
def test_numpy_path_does_not_depend_on_its_thread_count(tmp_path, monkeypatch, tile_cols, block_bytes):
    """Also with narrow tiles: 4096 columns in five tiles of 820, a few rows each (the layout 12288-wide weights get)."""
    import lorabox.merge.compute as compute

    if tile_cols:
        monkeypatch.setattr(compute, "TILE_COLS", tile_cols)
        monkeypatch.setattr(compute, "BLOCK_BYTES", block_bytes)
        monkeypatch.setattr(compute, "TILE_BYTES", block_bytes)
        assert len({c.start for _, c in compute._tiles(64, 4096)}) == 5
    base = flux_base(np.random.default_rng(2), "F16", n_in=4096)  # several row blocks per weight
    write_tensors(tmp_path / "base.safetensors", base)
    lora = random_lora("flux1", every=4, text_encoders=False)
    rng = np.random.default_rng(3)
    for a in lora.adapters.values():
        a.tensors["down"] = Tensor.from_values(rng.standard_normal((4, 4096)) * 0.1, "BF16")
    path = write_lora(tmp_path / "l.safetensors", lora, "kohya")
    merge(tmp_path / "base.safetensors", [(path, 1.0)], tmp_path / "one.safetensors", compute=NumpyCompute(1))
    merge(tmp_path / "base.safetensors", [(path, 1.0)], tmp_path / "two.safetensors", compute=NumpyCompute(3))
    merge(tmp_path / "base.safetensors", [(path, 1.0)], tmp_path / "np.safetensors",
          compute=NumpyCompute(3, kernels="numpy"))
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "np.safetensors").read_bytes()


def test_device_choice():
    assert isinstance(make_compute("cpu"), NumpyCompute)
    if not torch.cuda.is_available():
        assert isinstance(make_compute("auto"), NumpyCompute)
        with pytest.raises(Exception, match="no CUDA device"):
            make_compute("cuda")
    with pytest.raises(Exception, match="unknown --device"):
        make_compute("tpu")


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_fused_tiles_differ_from_the_definition_only_on_ties(dtype):
    """The float64 torch kernels fold ratio*scale into one BLAS call for 16-bit outputs (`_lora_tile`, `fused`). bf16
    factors and a ratio of 0.8 put many values exactly on float32 rounding ties, where the float64 sum's last bits
    decide; everywhere else the output must be the definition's. So: every element is the rounding of a value within
    1e-13 of the definition's float64 value, and at most one in 1e5 differs from rounding that value itself."""
    rng = np.random.default_rng(5)
    rows, cols, rank = 1024, 4096, 32
    w = Tensor.from_values(rng.standard_normal((rows, cols)) * 0.02, dtype)
    up = Tensor.from_values(rng.standard_normal((rows, rank)) * 0.01, "BF16")
    down = Tensor.from_values(rng.standard_normal((rank, cols)) * 0.01, "BF16")
    a = Adapter("unet", "m", tensors={"up": up, "down": down}, alpha=Tensor.scalar(rank / 2))
    from lorabox.merge.plan import Patch

    c = NumpyCompute(2, kernels="torch", certify=False)  # the float64 tiles (certified ones have no tie exception)
    with c.session():
        got = c.process(type("Info", (), {"name": "x.weight"}), w, [Patch(a, 0.8, None, 0)], dtype).array.copy()
    x = up.values() @ down.values()  # the definition's order: up@down, times scale, times ratio, plus W
    x *= a.scale
    x *= 0.8
    x += w.values()
    to = {"BF16": torch.bfloat16, "F16": torch.float16}[dtype]

    def rounded(v):
        return torch.from_numpy(v).to(to).view(torch.int16).numpy().view(np.uint16)

    got, want = got.view(np.uint16), rounded(x)
    near = (got == want) | (got == rounded(x * (1 + 1e-13))) | (got == rounded(x * (1 - 1e-13)))
    assert near.all()
    assert np.count_nonzero(got != want) <= got.size // 100_000
