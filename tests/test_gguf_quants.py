"""GGUF quantizers: legacy types byte-identical with gguf-py, K-quants decoded by gguf-py (the format's oracle)
exactly as by us, and at least as accurate as the legacy type of the same width."""
from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

from lorabox.errors import LoraboxError  # noqa: E402
from lorabox.quant import gguf_quants as gq  # noqa: E402
from lorabox.quant.gguf_quants import K_QUANTS, LEGACY, QuantError, dequantize, quantize  # noqa: E402


def rel_rmse(y, x) -> float:
    return float(np.sqrt(np.mean(np.square(y - x, dtype=np.float64)) / np.mean(np.square(x, dtype=np.float64))))


def awkward(shape, seed=0) -> np.ndarray:
    """Gaussian weights with outliers, zero rows, constant rows of either sign and an all-negative row."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    rows = x.reshape(-1, shape[-1])
    flat = x.reshape(-1)
    flat[rng.integers(0, flat.size, max(1, flat.size // 500))] *= 300  # outliers
    if rows.shape[0] > 1:
        rows[0] = 0
    if rows.shape[0] > 3:
        rows[1] = 0.5
        rows[2] = -0.25
        rows[3] = -np.abs(rows[3]) - 1e-3
    if rows.shape[0] > 5:
        rows[5, : shape[-1] // 2] = 0  # half a row of zeros
    return x


SHAPES = [(256,), (4, 512), (3, 5, 768), (80, 4096)]  # the last spans several work chunks


@pytest.mark.parametrize("qtype", LEGACY)
@pytest.mark.parametrize("shape", SHAPES)
def test_legacy_bytes_identical_to_gguf(qtype, shape):
    x = awkward(shape, seed=len(shape))
    ours = quantize(x, qtype)
    ref = gguf.quants.quantize(x, T[qtype])
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    assert np.array_equal(ours, ref)
    assert np.array_equal(dequantize(ours, qtype, shape), gguf.quants.dequantize(ref, T[qtype]))


@pytest.mark.parametrize("qtype", K_QUANTS)
@pytest.mark.parametrize("shape", [(256,), (4, 512), (3, 2, 768), (72, 4096)])
def test_k_quants_decode_as_gguf_decodes(qtype, shape):
    x = awkward(shape, seed=7)
    data = quantize(x, qtype)
    bs, ts = gguf.GGML_QUANT_SIZES[T[qtype]]
    assert data.dtype == np.uint8 and data.shape == (*shape[:-1], shape[-1] // bs * ts)
    ours = dequantize(data, qtype, shape)
    ref = gguf.quants.dequantize(data, T[qtype])
    assert ours.dtype == np.float32 and ours.shape == shape
    assert np.array_equal(ours, ref)
    rows = x.reshape(-1, shape[-1])
    back = ours.reshape(rows.shape)
    if rows.shape[0] > 3:  # constant rows come back (to fp16 precision of the scales)
        assert np.allclose(back[1], 0.5, rtol=2e-3) and np.allclose(back[2], -0.25, rtol=2e-3)
    assert rel_rmse(ours, x) < 0.06


def error_table(x: np.ndarray) -> dict[str, float]:
    return {qt: rel_rmse(dequantize(quantize(x, qt), qt, x.shape), x) for qt in ("Q4_1", "Q5_1", *K_QUANTS)}


@pytest.mark.parametrize("dist", ["normal", "student_t3"])
def test_k_quants_beat_legacy_of_same_width(dist):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((256, 4096)) if dist == "normal" else rng.standard_t(3, (256, 4096))
    err = error_table(x.astype(np.float32))
    print(dist, {k: round(v, 5) for k, v in err.items()})
    assert err["Q4_K"] <= err["Q4_1"]
    assert err["Q5_K"] <= err["Q5_1"]
    assert err["Q6_K"] < min(err["Q4_1"], err["Q5_1"])
    if dist == "normal":  # measured 0.0719 / 0.0363 / 0.0179: a weaker search shows up here
        assert err["Q4_K"] < 0.074 and err["Q5_K"] < 0.0370 and err["Q6_K"] < 0.0183


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_zero_blocks_decode_to_zero(qtype):
    x = (np.random.default_rng(2).standard_normal((6, 1024)) * 0.02).astype(np.float32)
    x[0] = 0
    x[3, 256:512] = 0          # one zero super-block between non-zero ones
    x[4, 32:64] = 0            # one zero sub-block
    x[5] = 1e-12               # below fp16 scale resolution
    ours = dequantize(quantize(x, qtype), qtype, x.shape)
    assert np.array_equal(ours[0], np.zeros(1024)) and np.array_equal(ours[3, 256:512], np.zeros(256))
    assert np.abs(ours[4, 32:64]).max() < 0.02 * 0.2
    assert np.abs(ours[5]).max() < 1e-6
    all_zero = quantize(np.zeros((2, 256), np.float32), qtype)
    assert not np.signbit(gguf.quants.dequantize(all_zero, T[qtype])).any()
    assert np.array_equal(gguf.quants.dequantize(all_zero, T[qtype]), np.zeros((2, 256)))


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_small_weights_keep_their_accuracy(qtype):
    """Diffusion weights are ~0.02; there the fp16 super-block scales are subnormal (coarse), notably Q6_K's."""
    x = np.random.default_rng(5).standard_normal((16, 4096)).astype(np.float32)
    err = [rel_rmse(dequantize(quantize(x * s, qtype), qtype, x.shape), x * s) for s in (1.0, 0.001)]
    assert err[1] < 1.02 * err[0]
    flat = np.full((4, 256), 1e-3, np.float32) * np.array([[1], [-1], [3], [-0.5]], np.float32)
    tol = 0.005 if qtype == "Q6_K" else 0.01  # Q6_K's d rounds away from zero (was 2.3 % off at 1e-3)
    assert np.abs(dequantize(quantize(flat, qtype), qtype, flat.shape) / flat - 1).max() < tol


def test_row_not_multiple_of_block_is_a_clear_error():
    with pytest.raises(QuantError) as err:
        quantize(np.zeros((4, 300), np.float32), "Q4_K")
    assert isinstance(err.value, ValueError) and isinstance(err.value, LoraboxError)
    assert str(err.value) == (
        "Can't quantize a tensor of shape (4, 300) to Q4_K: its last dimension is not a multiple of the block "
        "size 256. Keep such tensors in F16/F32 (as llama-quantize and ComfyUI-GGUF do).")
    with pytest.raises(QuantError, match="multiple of the block size 32"):
        quantize(np.zeros(48, np.float32), "Q8_0")
    quantize(np.zeros((4, 32), np.float32), "Q8_0")  # 32 is fine for the legacy types


def test_other_bad_input():
    with pytest.raises(QuantError, match=r"Unknown GGUF quant type 'Q3_K'\. lorabox quantizes to Q8_0, .*Q6_K\."):
        quantize(np.zeros(256, np.float32), "Q3_K")
    x = np.ones((2, 256), np.float32)
    for qtype in ("Q4_K", "Q6_K", "Q8_0"):
        for bad in (np.nan, np.inf):
            x[1, 7] = bad
            with pytest.raises(QuantError, match=f"Can't quantize to {qtype}: the tensor holds NaN or Inf"):
                quantize(x, qtype)
    with pytest.raises(QuantError, match="values too large for its fp16 block scales"):
        quantize(np.full((1, 256), 1e12, np.float32) * np.arange(256), "Q4_K")
    data = quantize(np.ones((2, 256), np.float32), "Q6_K")
    with pytest.raises(QuantError, match=r"420 bytes do not hold a Q6_K tensor of shape \(3, 256\) \(630 bytes\)"):
        dequantize(data, "Q6_K", (3, 256))
    assert np.array_equal(dequantize(data.tobytes(), "q6_k", [2, 256]), dequantize(data, T.Q6_K, (2, 256)))


@pytest.mark.parametrize("qtype", ("Q4_K", "Q5_K", "Q6_K", "Q4_0"))
def test_deterministic_whatever_the_threads(qtype, monkeypatch):
    x = awkward((16, 8192), seed=3)
    first = quantize(x, qtype)
    assert np.array_equal(first, quantize(x.copy(), qtype))
    assert np.array_equal(first, quantize(x, qtype, threads=1))
    monkeypatch.setattr(gq, "_CHUNK_SUPER", 7)   # other chunk boundaries, many threads
    monkeypatch.setattr(gq, "_CHUNK_LEGACY", 100)
    assert np.array_equal(first, quantize(x, qtype, threads=5))
    assert np.array_equal(dequantize(first, qtype, x.shape, threads=5), dequantize(first, qtype, x.shape))


def test_input_dtypes_and_empty():
    x = awkward((4, 512), seed=4)
    assert np.array_equal(quantize(x.astype(np.float64), "Q5_K"), quantize(x, "Q5_K"))
    half = x.astype(np.float16)
    assert np.array_equal(quantize(half, "Q5_K"), quantize(half.astype(np.float32), "Q5_K"))
    assert quantize(np.zeros((0, 256), np.float32), "Q4_K").shape == (0, 144)
    assert dequantize(np.zeros((0, 144), np.uint8), "Q4_K", (0, 256)).shape == (0, 256)


def test_docstring_examples_and_numpy_only():
    import doctest
    import subprocess
    import sys

    assert doctest.testmod(gq).failed == 0
    code = "import sys, lorabox.quant.gguf_quants; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_q8_0_ties_round_away_from_zero_as_gguf_does():
    """Our Q8_0 (gguf-py's arithmetic in fewer passes) on values that land exactly on halves, of both signs, and on
    the largest float below a half: the same bytes as gguf.quants."""
    halves = np.arange(-126.5, 127, 1.0, dtype=np.float32)  # 254 ties; with 127 in each block, d = 1 exactly
    below = np.nextafter(np.float32(0.5), np.float32(0)) * np.array([1, -1], np.float32)
    x = np.concatenate([halves, below]).reshape(-1, 32)
    x[:, 0] = 127.0
    x[1::2, 0] = -127.0
    ours = quantize(x, "Q8_0")
    assert np.array_equal(ours, gguf.quants.quantize(x, T.Q8_0))
    q = ours[:, 2:].view(np.int8)[:, 1:].reshape(-1)[: halves.size - 8]  # the halves (column 0 holds +-127)
    assert np.count_nonzero(np.abs(q.astype(int)) % 2) > 100  # 0.5 -> 1, 2.5 -> 3: not half to even


@pytest.mark.parametrize("qtype", LEGACY)
def test_legacy_edges_bytes_identical_to_gguf(qtype):
    """Blocks where gguf-py's steps decide by a hair: +m and -m both present (its argmax takes the first), blocks of
    signed zeros (the first value's sign reaches the stored scale), one-hot blocks, constant blocks, values on the
    rounding ties of the steps, bf16-valued weights (many equal magnitudes), fp16-subnormal and huge scales."""
    rng = np.random.default_rng(3)
    blocks = [rng.standard_normal((64, 32))]
    tie = rng.standard_normal((8, 32))
    tie[:4, 3], tie[:4, 9] = 4.0, -4.0  # + first
    tie[4:, 3], tie[4:, 9] = -4.0, 4.0  # - first
    blocks.append(tie)
    zeros = np.zeros((4, 32))
    zeros[0, 0] = zeros[2, 5] = -0.0
    zeros[3] = -0.0
    blocks.append(zeros)
    hot = np.zeros((4, 32))
    hot[0, 7], hot[1, 31], hot[2, 0], hot[3, 16] = 1.0, -2.5, 3e-3, -7.0
    blocks.append(hot)
    blocks.append(np.full((2, 32), 0.75) * np.array([[1.0], [-1.0]]))
    blocks.append(rng.integers(-16, 17, (16, 32)) / 2.0)  # on the halves of every step
    bf16 = (rng.standard_normal((64, 32)) * 0.02).astype(np.float32)
    blocks.append((bf16.view(np.uint32) & 0xFFFF0000).view(np.float32))
    blocks.append(rng.standard_normal((8, 32)) * 1e-7)
    blocks.append(rng.standard_normal((8, 32)) * 1e4)
    x = np.concatenate([b.astype(np.float32) for b in blocks])
    assert np.signbit(x[64 + 8 + 3]).all()  # a block of -0.0
    ref = gguf.quants.quantize(x, T[qtype])
    assert np.array_equal(quantize(x, qtype), ref)
    assert np.array_equal(quantize(x.reshape(-1, 64), qtype).reshape(ref.shape), ref)
