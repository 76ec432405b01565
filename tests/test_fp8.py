"""fp8 rounding (RNE, stochastic) and ComfyUI's scaled-fp8 layouts, against torch and ComfyUI's own code."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lorabox.io.safetensors import read_header, read_tensors, write_tensors
from lorabox.quant import fp8, pcg64_torch
from lorabox.tensor import Tensor
from tests.oracles.comfy import comfy_available, import_comfy, requires_comfy

TORCH = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DTYPES = tuple(TORCH)


def torch_bits(x: np.ndarray, dtype: str) -> np.ndarray:
    """What ComfyUI does before storing fp8: clamp to the finite range, then torch's cast."""
    m = torch.finfo(TORCH[dtype]).max
    return torch.from_numpy(np.ascontiguousarray(x, np.float32)).clamp(-m, m).to(TORCH[dtype]).view(torch.uint8).numpy()


def grid(dtype: str) -> np.ndarray:
    """Every finite non-negative fp8 value, ascending (float64)."""
    v = fp8.decode_fp8(np.arange(128, dtype=np.uint8), dtype).astype(np.float64)
    return np.unique(v[np.isfinite(v)])


def near(points: np.ndarray, ulps: int) -> np.ndarray:
    """Every float32 within `ulps` float32 steps of each non-negative point, with both signs."""
    bits = np.asarray(points, np.float32).view(np.uint32).astype(np.int64)
    around = (bits[:, None] + np.arange(-ulps, ulps + 1)[None, :]).reshape(-1)
    around = np.unique(around[(around >= 0) & (around < 0x7F800000)]).astype(np.uint32).view(np.float32)
    return np.concatenate([around, -around])


# -- round to nearest even -------------------------------------------------------------------------

def test_fp8_max():
    for dtype in DTYPES:
        assert fp8.fp8_max(dtype) == torch.finfo(TORCH[dtype]).max
    with pytest.raises(ValueError, match="not an fp8 dtype"):
        fp8.fp8_max("BF16")


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_matches_torch_on_all_256_codes(dtype):
    codes = np.arange(256, dtype=np.uint8)
    ours = fp8.decode_fp8(codes, dtype)
    theirs = torch.from_numpy(codes).view(TORCH[dtype]).to(torch.float32).numpy()
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs)  # NaN == NaN here; +-0 and +-inf in place
    assert np.array_equal(np.signbit(ours), np.signbit(theirs))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rne_matches_torch_near_every_boundary(dtype):
    """All float32 within 300 ulps of every fp8 value and of every midpoint (the ties), both signs, plus
    the region past the largest value, where ComfyUI's clamp saturates."""
    g = grid(dtype)
    mids = (g[:-1] + g[1:]) / 2  # exact in float32
    m = g[-1]
    step = g[-1] - g[-2]
    beyond = [m + step / 2, m + step, 2 * m, 65504.0, 3.0e38]
    x = near(np.concatenate([g, mids, beyond]), 300)
    np.testing.assert_array_equal(fp8.round_fp8(x, dtype), torch_bits(x, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rne_matches_torch_on_random_bit_patterns(dtype):
    """Uniform over all 2^32 float32 bit patterns: every binade, float32 subnormals, inf, NaN."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 2**32, size=1_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x[:8] = [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45]
    np.testing.assert_array_equal(fp8.round_fp8(x, dtype), torch_bits(x, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rne_matches_torch_on_weights_and_the_fp8_range(dtype):
    rng = np.random.default_rng(2)
    m = fp8.fp8_max(dtype)
    logs = rng.uniform(np.log2(1e-44), np.log2(m * 1.2), 500_000)  # log-uniform: subnormals to overflow
    x = np.concatenate([np.exp2(logs) * rng.choice([-1, 1], logs.size), rng.standard_normal(500_000) * 0.02])
    x = x.astype(np.float32).reshape(1000, 1000)
    ours = fp8.round_fp8(x, dtype)
    assert ours.shape == x.shape and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, torch_bits(x, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rne_special_values(dtype):
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e30, -1e30], np.float32)
    bits = fp8.round_fp8(x, dtype)
    m = fp8.fp8_max(dtype)
    values = fp8.decode_fp8(bits, dtype)
    assert list(bits[:2]) == [0x00, 0x80]  # zeros keep their sign
    assert list(values[[2, 3, 6, 7]]) == [m, -m, m, -m]  # saturated, never inf or NaN
    assert np.isnan(values[4]) and np.isnan(values[5])
    assert bits[4] == 0x7F and bits[5] == 0xFF  # torch's NaN, sign kept


def test_round_accepts_other_float_dtypes_and_odd_shapes():
    rng = np.random.default_rng(3)
    x64 = rng.standard_normal((3, 5, 7))
    np.testing.assert_array_equal(fp8.round_fp8(x64, "F8_E4M3"), torch_bits(x64.astype(np.float32), "F8_E4M3"))
    x16 = x64.astype(np.float16)[:, ::2]  # non-contiguous
    np.testing.assert_array_equal(fp8.round_fp8(x16, "F8_E5M2"), torch_bits(x16.astype(np.float32), "F8_E5M2"))
    assert fp8.round_fp8(np.zeros((0, 4), np.float32), "F8_E4M3").shape == (0, 4)
    assert fp8.round_fp8(np.float32(1.0625), "F8_E4M3").shape == ()


def test_chunking_is_invisible(monkeypatch):
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(10_001) * 0.05).astype(np.float32)
    whole = [fp8.round_fp8(x, "F8_E4M3"), fp8.round_fp8(x, "F8_E4M3", stochastic=True, seed=7)]
    monkeypatch.setattr(fp8, "CHUNK", 512)
    chunked = [fp8.round_fp8(x, "F8_E4M3"), fp8.round_fp8(x, "F8_E4M3", stochastic=True, seed=7)]
    for a, b in zip(whole, chunked):
        np.testing.assert_array_equal(a, b)


def test_segments_on_threads_are_invisible(monkeypatch):
    """Parallel segments each start the random stream where the single stream would be (PCG64.advance), so
    threads and segment size change no bit, also with a scale multiplier and an odd length."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(5)
    x = (rng.standard_normal(10_001) * 0.05).astype(np.float32)
    kinds = [dict(), dict(stochastic=True, seed=7)]
    whole = [fp8.round_fp8(x, "F8_E4M3", **k) for k in kinds]
    scaled = fp8.quantize_scaled(x, "F8_E5M2", stochastic=True, seed=9)
    monkeypatch.setattr(fp8, "CHUNK", 512)
    monkeypatch.setattr(fp8, "SEGMENT", 1024)  # at most two chunks per segment; the last chunk odd
    with ThreadPoolExecutor(3) as pool:
        for threads, p in ((1, None), (3, None), (3, pool), (8, None)):  # 8: segments of one chunk
            for kind, want in zip(kinds, whole):
                np.testing.assert_array_equal(fp8.round_fp8(x, "F8_E4M3", threads=threads, pool=p, **kind), want)
            bits, scale = fp8.quantize_scaled(x, "F8_E5M2", stochastic=True, seed=9, threads=threads, pool=p)
            np.testing.assert_array_equal(bits, scaled[0])
            assert scale == scaled[1]


# -- stochastic rounding ---------------------------------------------------------------------------

def test_seed_for_key_is_comfyui_string_to_seed():
    keys = ["", "diffusion_model.double_blocks.0.img_attn.qkv.weight", "model.diffusion_model.input_blocks.1.1"
            ".transformer_blocks.0.attn1.to_q.weight", "text_encoders.t5xxl.transformer.encoder.block.0.layer.0"
            ".SelfAttention.q.weight", "a"]
    assert fp8.seed_for_key("a") == 0xE8B7BE43  # the CRC32 check value of "a"
    if not comfy_available():  # the check value above still pins the convention
        return
    import_comfy()
    import comfy.model_patcher

    for key in keys:
        assert fp8.seed_for_key(key) == comfy.model_patcher.string_to_seed(key)
    # ComfyUI XORs whole code points into the register, so a non-ASCII name differs (none is a real key)
    assert fp8.seed_for_key("ä.weight") != comfy.model_patcher.string_to_seed("ä.weight")


def test_stochastic_needs_a_seed():
    with pytest.raises(ValueError, match="seed"):
        fp8.round_fp8(np.ones(3, np.float32), "F8_E4M3", stochastic=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_stochastic_picks_a_neighbour_and_keeps_exact_values(dtype):
    rng = np.random.default_rng(5)
    g = grid(dtype)
    x = np.concatenate([rng.standard_normal(100_000) * 0.02, np.exp2(rng.uniform(-30, 16, 100_000))])
    x = np.concatenate([x, -x]).astype(np.float32)
    q = fp8.decode_fp8(fp8.round_fp8(x, dtype, stochastic=True, seed=11), dtype).astype(np.float64)
    a = np.minimum(np.abs(x).astype(np.float64), g[-1])
    i = np.searchsorted(g, a, side="right") - 1  # g[i] <= a
    lo, hi = g[i], g[np.minimum(i + 1, g.size - 1)]
    assert np.all((np.abs(q) == lo) | (np.abs(q) == hi))
    assert np.all((np.sign(q) == np.sign(x)) | (q == 0))
    on_grid = np.concatenate([g, -g]).astype(np.float32)
    np.testing.assert_array_equal(fp8.round_fp8(on_grid, dtype, stochastic=True, seed=3), fp8.round_fp8(on_grid, dtype))
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e30], np.float32)
    np.testing.assert_array_equal(fp8.round_fp8(special, dtype, stochastic=True, seed=3), fp8.round_fp8(special, dtype))


def test_stochastic_is_deterministic_per_seed():
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((64, 33)) * 0.03).astype(np.float32)
    a = fp8.round_fp8(x, "F8_E4M3", stochastic=True, seed=fp8.seed_for_key("blocks.0.weight"))
    b = fp8.round_fp8(x, "F8_E4M3", stochastic=True, seed=fp8.seed_for_key("blocks.0.weight"))
    c = fp8.round_fp8(x, "F8_E4M3", stochastic=True, seed=fp8.seed_for_key("blocks.1.weight"))
    np.testing.assert_array_equal(a, b)
    assert np.mean(a != c) > 0.2
    # the stream runs in flat order: the result does not depend on the shape
    np.testing.assert_array_equal(fp8.round_fp8(x.reshape(-1), "F8_E4M3", stochastic=True,
                                                seed=fp8.seed_for_key("blocks.0.weight")), a.reshape(-1))


def _test_values(dtype: str, rng) -> np.ndarray:
    """Values inside the range that are hard to round: every kind of binade, fractions near 0 and 1 of a
    step, the fp8 subnormals, values far below the smallest subnormal, the top binade."""
    g = grid(dtype)
    lo = g[1:-1]
    step = np.diff(g)[1:]
    picks = rng.choice(lo.size, 24, replace=False)
    fractions = np.array([0.5, 1 / 3, 2**-10, 1 - 2**-10, 0.999, 0.01, 0.25, 0.7] * 3)
    x = lo[picks] + fractions * step[picks]
    tiny = g[1] * np.array([0.3, 2**-5, 2**-9, 0.999])  # below the smallest subnormal (exact down to 2^-5 of it)
    top = g[-2] + np.array([0.1, 0.5, 0.9]) * (g[-1] - g[-2])
    x = np.concatenate([x, tiny, top]).astype(np.float32)
    return np.concatenate([x, -x[::3]])



@pytest.mark.parametrize("dtype", ["F8_E4M3", "F8_E5M2"])
def test_the_device_twin_of_stochastic_rounding_gives_the_same_bits(dtype, monkeypatch):
    """TorchCompute's stochastic fp8 (the same PCG64 draws, made by torch: `pcg64_torch.draws`; the same integer
    steps in torch) on every kind of value: the hard ones, zeros, NaNs, infinities, float32 subnormals, beyond max."""
    monkeypatch.setattr(fp8, "CHUNK", 512)
    monkeypatch.setattr(fp8, "SEGMENT", 2048)  # numpy's rounding in segments, each from its place in the stream
    rng = np.random.default_rng(11)
    special = np.array([0.0, -0.0, np.nan, -np.nan, np.inf, -np.inf, 1e-45, -1e-40, 1e6, -1e6], np.float32)
    x = np.concatenate([_test_values(dtype, rng), special, (rng.standard_normal(9_999) * 0.03).astype(np.float32)])
    want = fp8.round_fp8(x, dtype, stochastic=True, seed=12345)
    draws = pcg64_torch.draws(torch, 12345, 0, x.size, "cpu")
    got = fp8.stochastic_bits_torch(torch, torch.from_numpy(x), draws, dtype).numpy()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_stochastic_is_unbiased(dtype):
    """Mean over 2^20 draws (16 seeds) within 6 standard errors of the exact value, for every value."""
    rng = np.random.default_rng(7)
    values = _test_values(dtype, rng)
    g = grid(dtype)
    n_copies, seeds = 1 << 16, [fp8.seed_for_key(f"layers.{i}.weight") for i in range(16)]
    total = np.zeros(values.size)
    x = np.repeat(values, n_copies)  # interleave: each value meets fresh draws in every seed
    for seed in seeds:
        q = fp8.decode_fp8(fp8.round_fp8(x, dtype, stochastic=True, seed=seed), dtype).astype(np.float64)
        total += q.reshape(values.size, n_copies).sum(axis=1)
    n = n_copies * len(seeds)
    mean = total / n
    a = np.abs(values.astype(np.float64))
    i = np.searchsorted(g, a, side="right") - 1
    step = g[i + 1] - g[i]
    p = (a - g[i]) / step
    stderr = np.sqrt(p * (1 - p) / n) * step
    error = np.abs(mean - values.astype(np.float64))
    # 6 standard errors, and at least one draw's worth of resolution for the rare events
    assert np.all(error <= 6 * stderr + step / n), (values[error > 6 * stderr + step / n])
    # and not a round-to-nearest in disguise: the rounding errors of RNE are far larger than that
    rne = fp8.decode_fp8(fp8.round_fp8(values, dtype), dtype).astype(np.float64)
    visible = np.abs(rne - values) > 8 * stderr + step / n
    assert visible.sum() > values.size // 2
    assert np.all(error[visible] < np.abs(rne - values)[visible])


@requires_comfy
@pytest.mark.parametrize("dtype", DTYPES)
def test_stochastic_has_comfyui_statistics(dtype):
    """ComfyUI's `stochastic_rounding` (its own stream) rounds up as often as ours, for values float16
    represents exactly (ComfyUI first rounds to float16 and adds float16 noise, hence a small allowance)."""
    import_comfy()
    import comfy.float

    rng = np.random.default_rng(8)
    g = grid(dtype)
    values = _test_values(dtype, rng)
    values = values[np.abs(values) >= 2**-14].astype(np.float16).astype(np.float32)  # fp16 normals, exact
    n = 1 << 15
    x = np.repeat(values, n)
    seed = fp8.seed_for_key("double_blocks.0.img_mlp.0.weight")
    ours = fp8.decode_fp8(fp8.round_fp8(x, dtype, stochastic=True, seed=seed), dtype).reshape(values.size, n)
    theirs = comfy.float.stochastic_rounding(torch.from_numpy(x), TORCH[dtype], seed=seed)
    theirs = theirs.to(torch.float32).numpy().reshape(values.size, n)
    a = np.abs(values.astype(np.float64))
    i = np.searchsorted(g, a, side="right") - 1
    p = (a - g[i]) / (g[i + 1] - g[i])
    up_ours = (np.abs(ours) > g[i][:, None]).mean(axis=1)
    up_theirs = (np.abs(theirs) > g[i][:, None]).mean(axis=1)
    sigma = np.sqrt(np.maximum(p * (1 - p), 1 / n) / n)
    assert np.all(np.abs(up_ours - p) <= 6 * sigma)
    assert np.all(np.abs(up_theirs - p) <= 6 * sigma + 2**-7)  # float16 noise granularity
    assert np.all(np.abs(up_ours - up_theirs) <= 9 * sigma + 2**-7)


# -- scaled fp8 ------------------------------------------------------------------------------------

def test_compute_scale():
    w = np.array([[0.5, -2.0], [1.0, 0.0]], np.float32)
    assert fp8.compute_scale(w, "F8_E4M3") == np.float32(2.0) / np.float32(448.0)
    assert fp8.compute_scale(w, "F8_E4M3").dtype == np.float32
    assert fp8.compute_scale(np.zeros(4, np.float32), "F8_E5M2") == 1.0
    with pytest.raises(ValueError, match="inf or NaN"):
        fp8.compute_scale(np.array([1.0, np.nan], np.float32), "F8_E4M3")


def test_quantize_scaled_round_trip():
    rng = np.random.default_rng(9)
    w = (rng.standard_normal((48, 64)) * 0.02).astype(np.float32)
    for dtype in DTYPES:
        bits, scale = fp8.quantize_scaled(w, dtype)
        assert scale.shape == () and scale.dtype == np.float32
        assert np.max(np.abs(fp8.decode_fp8(bits, dtype))) == fp8.fp8_max(dtype)  # the range is used fully
        back = fp8.dequantize_scaled(bits, dtype, scale)
        rel = 2.0 ** -(4 if dtype == "F8_E4M3" else 3)  # half a step of the mantissa, relative
        assert np.all(np.abs(back - w) <= rel * np.abs(w) + fp8.decode_fp8(np.uint8(1), dtype) * scale)
        # a kept scale saturates what no longer fits
        bits2, scale2 = fp8.quantize_scaled(w * 2, dtype, scale=scale)
        assert scale2 == scale and np.max(np.abs(fp8.decode_fp8(bits2, dtype))) == fp8.fp8_max(dtype)
    with pytest.raises(ValueError, match="positive"):
        fp8.quantize_scaled(w, "F8_E4M3", scale=0.0)
    # the scale is applied chunk by chunk to float32(w), whatever w's dtype
    w64 = w.astype(np.float64) * (1 + 1e-9)
    for stochastic in (False, True):
        a = fp8.quantize_scaled(w64, "F8_E4M3", stochastic=stochastic, seed=1)
        b = fp8.quantize_scaled(w64.astype(np.float32), "F8_E4M3", stochastic=stochastic, seed=1)
        np.testing.assert_array_equal(a[0], b[0])
        assert a[1] == b[1]
    per_row = fp8.compute_scale(w, "F8_E4M3") * np.linspace(0.5, 1, 48, dtype=np.float32)[:, None]
    bits, scale = fp8.quantize_scaled(w, "F8_E4M3", scale=per_row)  # kohya-style [out, 1] scales broadcast
    np.testing.assert_array_equal(fp8.dequantize_scaled(bits, "F8_E4M3", scale),
                                  fp8.decode_fp8(bits, "F8_E4M3") * per_row)


def _comfy_quant_ops():
    import_comfy()
    import comfy.quant_ops

    return comfy.quant_ops


@requires_comfy
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_scaled_matches_comfyui_bit_for_bit(dtype):
    """ComfyUI's TensorCoreFP8Layout.quantize, round to nearest: recomputed scale and a given one."""
    layout = _comfy_quant_ops().TensorCoreFP8Layout
    rng = np.random.default_rng(10)
    w = (rng.standard_normal((96, 80)) * 0.02).astype(np.float32)
    w[3, 7] = 0.9  # an outlier sets the scale
    for scale in (None, np.float32(0.0011)):
        bits, ours_scale = fp8.quantize_scaled(w, dtype, scale=scale)
        q, params = layout.quantize(torch.from_numpy(w.copy()), scale=None if scale is None else torch.tensor(scale),
                                    dtype=TORCH[dtype], stochastic_rounding=0)
        np.testing.assert_array_equal(bits, q.view(torch.uint8).numpy())
        assert params["scale"].dtype == torch.float32
        assert params["scale"].numpy().tobytes() == ours_scale.tobytes()
        back = layout.dequantize(q, params["scale"], torch.float32).numpy()
        np.testing.assert_array_equal(fp8.dequantize_scaled(bits, dtype, ours_scale), back)


@requires_comfy
def test_quantize_scaled_stochastic_like_comfyui():
    """ComfyUI's stochastic path (the one it takes after a LoRA patch): same scale, same error statistics."""
    layout = _comfy_quant_ops().TensorCoreFP8Layout
    rng = np.random.default_rng(11)
    w = (rng.standard_normal((256, 256)) * 0.02).astype(np.float32)
    seed = fp8.seed_for_key("diffusion_model.single_blocks.3.linear1.weight")
    bits, scale = fp8.quantize_scaled(w, "F8_E4M3", stochastic=True, seed=seed)
    q, params = layout.quantize(torch.from_numpy(w.copy()), scale=None, dtype=torch.float8_e4m3fn,
                                stochastic_rounding=seed)
    assert params["scale"].numpy().tobytes() == scale.tobytes()
    ours = fp8.dequantize_scaled(bits, "F8_E4M3", scale) - w
    theirs = layout.dequantize(q, params["scale"], torch.float32).numpy() - w
    n = w.size
    assert abs(ours.mean()) < 6 * ours.std() / np.sqrt(n)  # unbiased
    assert abs(theirs.mean()) < 6 * theirs.std() / np.sqrt(n)
    assert 0.9 < ours.std() / theirs.std() < 1.1
    assert not np.array_equal(bits, q.view(torch.uint8).numpy())  # a different random stream, as documented


# -- ComfyUI layouts -------------------------------------------------------------------------------

def _layers(rng, dtype, layout, names=("blocks.0.lin", "blocks.1.lin"), **kw):
    sd, ref = {}, {}
    for i, name in enumerate(names):
        w = (rng.standard_normal((16, 12)) * 0.05 * (i + 1)).astype(np.float32)
        bits, scale = fp8.quantize_scaled(w, dtype)
        sd.update(fp8.scaled_layer_tensors(name, bits, dtype, scale, layout=layout,
                                           input_scale=np.float32(0.5 + i), **kw))
        sd[f"{name}.bias"] = Tensor(rng.standard_normal(16).astype(np.float32), "F32")
        ref[name] = fp8.dequantize_scaled(bits, dtype, scale)
    return sd, ref


def _torch_state_dict(tmp_path, sd, metadata=None):
    """Through a file, as ComfyUI gets it: lorabox writes, safetensors' torch loader reads."""
    import safetensors.torch

    path = tmp_path / "model.safetensors"
    write_tensors(path, sd, metadata)
    return path, safetensors.torch.load_file(str(path))


def _comfy_module(ops, names):
    root = torch.nn.Module()
    for name in names:
        block, index, leaf = name.split(".")
        if not hasattr(root, block):
            setattr(root, block, torch.nn.ModuleDict())
        getattr(root, block)[index] = torch.nn.ModuleDict({leaf: ops.Linear(12, 16, bias=True)})
    return root


@requires_comfy
@pytest.mark.parametrize("dtype", DTYPES)
def test_legacy_layout_through_comfyui_scaled_fp8_ops(tmp_path, dtype):
    import_comfy()
    import comfy.ops

    rng = np.random.default_rng(12)
    sd, ref = _layers(rng, dtype, "legacy")
    sd["scaled_fp8"] = fp8.scaled_fp8_marker(dtype)
    path, tsd = _torch_state_dict(tmp_path, sd)
    marker = tsd.pop("scaled_fp8")
    assert marker.dtype == TORCH[dtype] and marker.numel() == 0  # what model_detection reads
    ops = comfy.ops.scaled_fp8_ops(fp8_matrix_mult=False, scale_input=True, override_dtype=marker.dtype)
    model = _comfy_module(ops, ref)
    missing, unexpected = model.load_state_dict(tsd, strict=True)
    assert not missing and not unexpected
    for name, w in ref.items():
        lin = model.get_submodule(name)
        assert lin.weight.dtype == TORCH[dtype]
        np.testing.assert_array_equal(lin.convert_weight(lin.weight).detach().numpy(), w)

    info = fp8.detect_scaled_fp8(read_header(path)[0])
    assert info.layout == "legacy" and info.markers == {"scaled_fp8": (dtype, False)}
    assert set(info.layers) == set(ref)
    layer = info.layers["blocks.1.lin"]
    assert (layer.scale_key, layer.input_scale_key, layer.dtype) == ("blocks.1.lin.scale_weight",
                                                                     "blocks.1.lin.scale_input", dtype)
    assert info.aux_keys == {"scaled_fp8"} | {f"{n}.{s}" for n in ref for s in ("scale_weight", "scale_input")}


def test_legacy_marker_matches_comfyui_save(tmp_path):
    """ComfyUI saves the marker as `torch.tensor([], dtype=fp8)`; 2 elements switch fp8 matmul off."""
    import safetensors.torch

    for dtype, tdtype in TORCH.items():
        safetensors.torch.save_file({"scaled_fp8": torch.tensor([], dtype=tdtype)}, str(tmp_path / "c.safetensors"))
        write_tensors(tmp_path / "l.safetensors", {"scaled_fp8": fp8.scaled_fp8_marker(dtype)})
        assert read_header(tmp_path / "c.safetensors")[0] == read_header(tmp_path / "l.safetensors")[0]
    two = fp8.scaled_fp8_marker("F8_E4M3", full_precision_matrix_mult=True)
    assert two.shape == (2,)
    info = fp8.detect_scaled_fp8({"m.scaled_fp8": two, "m.a.weight": ("F8_E4M3", (2, 2)),
                                  "m.a.scale_weight": ("F32", ())})
    assert info.layers["m.a"].full_precision_matrix_mult
    # a float32 marker means e4m3fn, as in ComfyUI's model_detection
    info = fp8.detect_scaled_fp8({"scaled_fp8": ("F32", (0,)), "a.weight": "F8_E4M3", "a.scale_weight": "F32"})
    assert info.markers["scaled_fp8"] == ("F8_E4M3", False) and info.layers["a"].format == "float8_e4m3fn"


@requires_comfy
def test_comfy_quant_layout_through_comfyui_mixed_precision_ops(tmp_path):
    """Header-metadata flavour: ComfyUI's detect_layer_quantization + mixed_precision_ops load it and
    dequantize to our values (ComfyUI 0.3.75 knows float8_e4m3fn only)."""
    import_comfy()
    import comfy.model_detection
    import comfy.ops

    rng = np.random.default_rng(13)
    sd, ref = _layers(rng, "F8_E4M3", "comfy_quant", conf_tensor=False)
    metadata = {fp8.METADATA_KEY: fp8.quantization_metadata({n: fp8.comfy_quant_conf("F8_E4M3") for n in ref})}
    path, tsd = _torch_state_dict(tmp_path, sd, metadata)
    layers = comfy.model_detection.detect_layer_quantization(dict(read_header(path)[1]))
    assert layers == {n: {"format": "float8_e4m3fn"} for n in ref}
    model = _comfy_module(comfy.ops.mixed_precision_ops(layers, compute_dtype=torch.float32), ref)
    missing, unexpected = model.load_state_dict(tsd, strict=True)
    assert not missing and not unexpected
    for i, (name, w) in enumerate(ref.items()):
        lin = model.get_submodule(name)
        np.testing.assert_array_equal(lin.weight.dequantize().detach().numpy(), w)
        assert lin.input_scale.item() == 0.5 + i

    info = fp8.detect_scaled_fp8(read_header(path)[0], read_header(path)[1])
    assert info.layout == "comfy_quant" and not info.markers
    layer = info.layers["blocks.0.lin"]
    assert (layer.format, layer.scale_key, layer.input_scale_key, layer.conf_key) == \
        ("float8_e4m3fn", "blocks.0.lin.weight_scale", "blocks.0.lin.input_scale", None)


def test_comfy_quant_tensor_layout(tmp_path):
    """Per-layer `.comfy_quant` tensors (newer ComfyUI): the bytes are `json.dumps(conf)` in UTF-8, as
    ComfyUI writes them, and `json.loads(tensor.numpy().tobytes())`, as it reads them, gives the conf."""
    rng = np.random.default_rng(14)
    sd, ref = _layers(rng, "F8_E5M2", "comfy_quant", full_precision_matrix_mult=True)
    path, tsd = _torch_state_dict(tmp_path, sd)
    conf = {"format": "float8_e5m2", "full_precision_matrix_mult": True}
    for name in ref:
        t = tsd[f"{name}.comfy_quant"]
        assert t.dtype == torch.uint8 and t.ndim == 1
        assert t.numpy().tobytes() == json.dumps(conf).encode("utf-8")
        assert json.loads(t.numpy().tobytes()) == conf
        assert tsd[f"{name}.weight"].dtype == torch.float8_e5m2
        assert tsd[f"{name}.weight_scale"].dtype == torch.float32 and tsd[f"{name}.weight_scale"].shape == ()

    tensors, _ = read_tensors(path)
    header = read_header(path)[0]
    for info in (fp8.detect_scaled_fp8(header, read=tensors.__getitem__), fp8.detect_scaled_fp8(header)):
        assert info.layout == "comfy_quant" and set(info.layers) == set(ref)
        layer = info.layers["blocks.1.lin"]
        assert (layer.format, layer.dtype, layer.conf_key) == ("float8_e5m2", "F8_E5M2", "blocks.1.lin.comfy_quant")
    assert fp8.detect_scaled_fp8(header, read=tensors.__getitem__).layers["blocks.1.lin"].full_precision_matrix_mult
    for name, w in ref.items():
        t = tensors[f"{name}.weight"]
        np.testing.assert_array_equal(fp8.dequantize_scaled(t.array, t.dtype, tensors[f"{name}.weight_scale"].array), w)


def test_comfy_quant_conf_round_trip():
    conf = fp8.comfy_quant_conf("F8_E4M3")
    assert conf == {"format": "float8_e4m3fn"}
    t = fp8.encode_comfy_quant(conf)
    assert t.dtype == "U8" and t.array.tobytes() == b'{"format": "float8_e4m3fn"}'
    assert fp8.parse_comfy_quant(t) == fp8.parse_comfy_quant(t.array.tobytes()) == conf
    with pytest.raises(ValueError, match="JSON object"):
        fp8.parse_comfy_quant(b"[1]")
    assert json.loads(fp8.quantization_metadata({"a": conf})) == {"format_version": "1.0", "layers": {"a": conf}}


def test_detect_other_cases():
    assert fp8.detect_scaled_fp8({"a.weight": "BF16", "b.weight": "F8_E4M3"}).layout is None
    # kohya's scale_weight without ComfyUI's marker is not ComfyUI's layout
    assert not fp8.detect_scaled_fp8({"a.weight": "F8_E4M3", "a.scale_weight": ("F32", (16, 1))}).layers
    # a text-encoder marker and a diffusion-model marker: each scale belongs to the longest prefix
    entries = {"model.diffusion_model.scaled_fp8": "F8_E4M3", "model.diffusion_model.x.weight": "F8_E4M3",
               "model.diffusion_model.x.scale_weight": "F32", "te.scaled_fp8": ("F8_E5M2", (0,)),
               "te.y.weight": "F8_E5M2", "te.y.scale_weight": "F32", "other.z.scale_weight": "F32"}
    info = fp8.detect_scaled_fp8(entries)
    assert set(info.layers) == {"model.diffusion_model.x", "te.y"}
    assert info.layers["te.y"].format == "float8_e5m2" and info.layers["model.diffusion_model.x"].dtype == "F8_E4M3"
    assert info.markers["model.diffusion_model.scaled_fp8"] == ("F8_E4M3", None)  # no shape: unknown
    # both layouts in one file
    entries.update({"n.weight": "F8_E4M3", "n.weight_scale": "F32", "n.comfy_quant": ("U8", (26,))})
    assert fp8.detect_scaled_fp8(entries).layout == "mixed"
    # header metadata may spell a layer's config as a bare format string
    meta = {fp8.METADATA_KEY: json.dumps({"layers": {"n": "float8_e4m3fn"}})}
    assert fp8.detect_scaled_fp8({"n.weight": "F8_E4M3"}, meta).layers["n"].format == "float8_e4m3fn"
    with pytest.raises(ValueError, match="layers"):
        fp8.detect_scaled_fp8({}, {fp8.METADATA_KEY: "{}"})
    with pytest.raises(ValueError, match="layout"):
        fp8.scaled_layer_tensors("a", np.zeros(2, np.uint8), "F8_E4M3", 1.0, layout="kohya")
