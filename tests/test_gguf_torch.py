"""The GPU path's GGUF quantizers (`lorabox.quant.gguf_torch`) give the CPU path's bytes (`gguf_quants.quantize`:
gguf-py's arithmetic for the legacy types, which test_gguf_quants holds byte for byte to gguf-py, and our K-quant
search), and its decoders gguf-py's floats.
Run on torch's CPU device here, and on the GPU too with `LORABOX_TEST_CUDA=1`."""
import numpy as np
import pytest
import torch

from lorabox.quant import gguf_quants as gq
from lorabox.quant import gguf_torch as gt
from lorabox.quant.gguf_quants import QTYPES, QuantError
from tests.test_merge_devices import DEVICES
from tests.test_gguf_quants import awkward


def hard_rows(seed: int = 0) -> np.ndarray:
    """Rows that put the search on its edges: weights over 40 binades, ties of |max| with either sign first,
    values on rounding ties of every step, scales in fp16's subnormal range (Q6_K's outward rounding), a
    one-hot row, and fp16-valued weights (a bf16/fp16 base)."""
    rng = np.random.default_rng(seed)
    rows = [(rng.standard_normal((16, 256)) * np.exp2(rng.uniform(-30, 10, (16, 1)))).astype(np.float32)]
    tie = rng.standard_normal((4, 256)).astype(np.float32)
    tie[:, 0], tie[:, 1] = 3.0, -3.0  # |max| twice, + first
    tie[:, 32], tie[:, 33] = -3.0, 3.0  # - first
    rows.append(tie)
    rows.append((rng.integers(-16, 17, (8, 256)) / np.float32(16)).astype(np.float32))  # on ties of the steps
    rows.append((rng.standard_normal((8, 256)) * 1e-5).astype(np.float32))  # Q6_K: d below fp16's normals
    hot = np.zeros((2, 256), np.float32)
    hot[0, 17], hot[1, 200] = 1.0, -7e-3
    rows.append(hot)
    rows.append(rng.standard_normal((8, 256)).astype(np.float16).astype(np.float32) * np.float32(0.03))
    return np.concatenate(rows)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", QTYPES)
def test_same_bytes_as_the_cpu_path(device, qtype):
    for x in (hard_rows(), awkward((3, 5, 768), seed=2), awkward((40, 4096), seed=5)):
        want = gq.quantize(x, qtype)
        got = gt.quantize(torch.from_numpy(x).to(device), qtype)
        assert got.device.type == torch.device(device).type and got.dtype == torch.uint8
        assert got.shape == want.shape
        assert np.array_equal(got.cpu().numpy(), want), qtype


@pytest.mark.parametrize("device", DEVICES)
def test_steps_and_edges(device, monkeypatch):
    """The bytes do not depend on the step size; a mutated step of the search changes them (the test can fail)."""
    x = torch.from_numpy(awkward((16, 4096), seed=8)).to(device)
    first = gt.quantize(x, "Q5_K")
    monkeypatch.setattr(gt, "CHUNK", 256 * 3)
    assert torch.equal(gt.quantize(x, "Q5_K"), first)
    monkeypatch.setitem(gq._STEPS, "Q5_K", gq._STEPS["Q5_K"][:-1])  # the torch port reads the same candidates
    assert not torch.equal(gt.quantize(x, "Q5_K"), first)
    empty = gt.quantize(torch.zeros((0, 256), device=device), "Q4_K")
    assert empty.shape == (0, 144)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_as_the_cpu_path(device):
    x = torch.ones((2, 256), device=device)
    for qtype in ("Q4_K", "Q6_K", "Q8_0", "Q5_1"):
        for bad in (float("nan"), float("inf")):
            x[1, 7] = bad
            with pytest.raises(QuantError, match=f"Can't quantize to {qtype}: the tensor holds NaN or Inf"):
                gt.quantize(x, qtype)
    big = np.full((1, 256), 1e12, np.float32) * np.arange(256, dtype=np.float32)
    for mod, arg in ((gq, big), (gt, torch.from_numpy(big).to(device))):
        with pytest.raises(QuantError, match="values too large for its fp16 block scales"):
            mod.quantize(arg, "Q4_K")
    with pytest.raises(QuantError, match="multiple of the block size 256"):
        gt.quantize(torch.zeros((4, 300), device=device), "Q6_K")
    with pytest.raises(QuantError, match="Unknown GGUF quant type 'Q3_K'"):
        gt.quantize(torch.zeros(256, device=device), "Q3_K")


def random_blocks(qtype: str, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random bytes for every field of every block (all nibbles, high bits and packed 6-bit scales), with the
    float16 scale fields made finite: anything a file can hold that decodes to numbers."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    ts = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][1]
    raw = np.random.default_rng(seed).integers(0, 256, (n_blocks, ts), dtype=np.uint8)
    scales = {"Q4_1": (0, 2), "Q5_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (ts - 2,)}.get(qtype, (0,))
    for at in scales:
        h = raw[:, at:at + 2].copy().view(np.uint16)
        h[(h & 0x7C00) == 0x7C00] &= 0xBFFF  # exponent all ones (Inf/NaN) -> a finite value
        raw[:, at:at + 2] = h.view(np.uint8)
    return raw


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", QTYPES)
def test_decodes_as_gguf_py(device, qtype, monkeypatch):
    """`dequantize` on the device, and the CPU path's (`gguf_quants.dequantize`, our own decoders), give the float32
    bits of gguf-py's own `gguf.quants.dequantize` over random bytes in every field; the bytes of `quantize` decode
    to the CPU path's values."""
    import gguf

    bs = 256 if qtype in gq.K_QUANTS else 32
    raw = random_blocks(qtype, 1536)
    shape = (1536 * bs // 512, 512)
    want = gguf.quants.dequantize(raw.reshape(-1), gguf.GGMLQuantizationType[qtype]).astype(np.float32)
    monkeypatch.setattr(gt, "CHUNK", 512 * bs)  # several steps
    got = gt.dequantize(torch.from_numpy(raw.reshape(-1)).to(device), qtype, shape)
    assert got.device.type == torch.device(device).type and got.dtype == torch.float32 and got.shape == shape
    assert np.array_equal(got.cpu().numpy().view(np.uint32), want.reshape(shape).view(np.uint32)), qtype
    assert np.array_equal(gq.dequantize(raw, qtype, shape).view(np.uint32), want.reshape(shape).view(np.uint32))

    x = awkward((24, 1024), seed=3)
    data = gt.quantize(torch.from_numpy(x).to(device), qtype)
    assert np.array_equal(gt.dequantize(data, qtype, x.shape).cpu().numpy(), gq.dequantize(gq.quantize(x, qtype),
                                                                                           qtype, x.shape))
    with pytest.raises(QuantError, match=f"bytes do not hold a {qtype} tensor of shape"):
        gt.dequantize(data[:-1], qtype, x.shape)
