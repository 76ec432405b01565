"""The certified tiles of a bfloat16 or float16 weight with bfloat16 factors in one compiled loop
(`lorabox.merge._bf16_tiles`): the float64 definition's bytes, as torch rounds them, for every shape the loop splits
(6-row panels and single rows, 64- and 16-column blocks, columns past the last 16 through the float32 GEMM, odd ranks
padded), with the products formed both ways: AVX512_BF16's pair products where this CPU has them, the FMA twin
everywhere."""
import threading

import numpy as np
import pytest

from lorabox.lora import Adapter
from lorabox.merge import _bf16_tiles, certified
from lorabox.merge.compute import NumpyCompute
from lorabox.merge.plan import Patch
from lorabox.tensor import Tensor
from tests.test_merge_certified import INFO, _bits, _case, _definition

DOTS = ["fma", pytest.param("bf16", marks=pytest.mark.skipif(not _bf16_tiles.has_avx512_bf16(),
                                                             reason="this CPU has no AVX512_BF16"))]


@pytest.fixture
def counted(monkeypatch):
    """Counts the compiled loop's tiles and repaired elements of what runs next."""
    seen = {"tiles": 0, "repaired": 0}
    real = certified.bf16_tiles

    def spy(dot, dtype="BF16"):
        fn, repair = real(dot, dtype)

        def tile(*args):
            seen["tiles"] += 1
            return fn(*args)

        def fix(*args):
            n = repair(*args)
            seen["repaired"] += n
            return n

        return tile, fix

    monkeypatch.setattr(certified, "bf16_tiles", spy)
    return seen


def _merge(w, up, down, ratio, dot, threads=2, scale=0.5) -> np.ndarray:
    """`w` merged with one LoRA by `NumpyCompute.process`, kept in its type."""
    a = Adapter("unet", "m", tensors={"up": up, "down": down}, alpha=Tensor.scalar(up.shape[1] * scale))
    c = NumpyCompute(threads, kernels="torch")
    c.bf16_dot = dot
    with c.session():
        return c.process(INFO, w, [Patch(a, ratio, None, 0)], w.dtype).array.copy().view(np.uint16)


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
@pytest.mark.parametrize("dot", DOTS)
@pytest.mark.parametrize("rows, cols, rank, delta", [
    (512, 2048, 32, 0.003), (512, 2048, 32, 0.03),  # whole panels and 64-column blocks
    (97, 1000, 7, 0.03),  # a single-row tail, 16-column blocks, 8 columns for the float32 GEMM, an odd rank
    (6, 16, 1, 0.1), (13, 4160, 64, 0.02),  # two tiles of 2080 columns: 32 blocks of 64 and two of 16 each
    (7, 10240, 8, 0.03),  # SDXL's width: three tiles, 3424 + 3424 + 3392 columns (multiples of 16)
    (12, 256, 128, 0.01)])  # a high rank: 64 pairs per element
def test_bytes_are_the_definitions(dot, dtype, rows, cols, rank, delta, counted):
    """Ratio 0.8 with bf16 factors puts many float64 values on float32 ties: every byte is still the definition's,
    and with the larger deltas the repairs are part of why."""
    w, up, down = _case(dtype, rows, cols, rank, delta)
    got = _merge(w, up, down, 0.8, dot)
    assert np.array_equal(got, _bits(_definition(w, up, down, 0.5, 0.8), dtype))  # alpha = rank / 2
    assert counted["tiles"] > 0
    if delta >= 0.03 and rows * cols > 10000:
        assert 0 < counted["repaired"] < got.size // 20  # float16's 11 bits flag 2 % of these, bfloat16's 0.2 %


def _direct(dot, w, up, down, factors):
    """The loop on one tile covering the whole weight, no repairs: (output bits, flags per element)."""
    fn, _ = certified.bf16_tiles(dot, w.dtype)
    rows, cols = w.shape
    s = float(np.prod(factors))
    row_bound, col_bound = certified.bounds(up.values() * s, down.values())
    packed_up, packed_down = _bf16_tiles.pack_up(up.array), _bf16_tiles.pack_down(down.array)
    out = np.zeros((rows, cols), np.uint16)
    masks = np.zeros((rows, cols // 16), np.uint16)
    fn(packed_up.ctypes.data, packed_up.shape[1], packed_down.ctypes.data, cols, w.array.ctypes.data, cols,
       out.ctypes.data, cols, masks.ctypes.data, cols // 16, row_bound.ctypes.data, col_bound.ctypes.data,
       np.float32(s), _bf16_tiles.tiny(s, up.shape[1]), rows, cols)
    flags = np.unpackbits(masks.view(np.uint8), bitorder="little").reshape(rows, cols).astype(bool)
    return out, flags


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
@pytest.mark.parametrize("dot", DOTS)
def test_the_proof_is_needed_and_sufficient(dot, dtype):
    """Every element the loop does not flag is the definition's; some flagged ones are not (so the repairs are
    needed); and few are flagged."""
    w, up, down = _case(dtype, 256, 1024, 32, delta=0.03, seed=11)
    factors = (0.5, 0.8)
    want = _bits(_definition(w, up, down, *factors), dtype)
    out, flags = _direct(dot, w, up, down, factors)
    assert np.array_equal(out[~flags], want[~flags])
    assert np.count_nonzero(out[flags] != want[flags]) > 0
    assert flags.sum() < out.size // 20


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
@pytest.mark.parametrize("dot", DOTS)
def test_special_values(dot, dtype):
    """NaN, infinities, signed zeros, subnormal W, a zero row of `up`, overflow past the format's largest value: as
    torch rounds the definition (NaN bits aside: torch's own vary, lorabox writes its scalar ones)."""
    rng = np.random.default_rng(3)
    rows, cols, rank = 16, 64, 8
    big = 60000.0 if dtype == "F16" else 3.0e38
    tiny = 2.0 ** -20 if dtype == "F16" else 2.0 ** -130  # subnormal in the format
    values = [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, big, -big, tiny, -tiny, 1.0, -1.0]
    w64 = rng.standard_normal((rows, cols)) * 0.02
    w64.reshape(-1)[: len(values) * 4] = np.repeat(values, 4)
    w = Tensor.from_values(w64, dtype)
    up64 = rng.standard_normal((rows, rank)) * 0.1
    up64[3] = 0.0
    up64[0, 0] = 2.0 ** 12 if dtype == "F16" else 2.0 ** 120  # pushes `big` past the largest value
    up, down = Tensor.from_values(up64, "BF16"), Tensor.from_values(rng.standard_normal((rank, cols)) * 0.1, "BF16")
    with np.errstate(all="ignore"):
        want = _bits(_definition(w, up, down, 0.75, 0.8), dtype)
    a = Adapter("unet", "m", tensors={"up": up, "down": down}, alpha=Tensor.scalar(rank * 0.75))
    c = NumpyCompute(1, kernels="torch")
    c.bf16_dot = dot
    with c.session():
        got = c.process(INFO, w, [Patch(a, 0.8, None, 0)], dtype).array.view(np.uint16)
    exp, man = (0x7C00, 0x03FF) if dtype == "F16" else (0x7F80, 0x007F)

    def nan(bits):
        return ((bits & exp) == exp) & ((bits & man) != 0)

    assert np.array_equal(nan(got), nan(want)) and nan(want).reshape(-1)[:8].all()
    assert np.array_equal(got[~nan(want)], want[~nan(want)])


@pytest.mark.parametrize("dot", DOTS)
@pytest.mark.parametrize("scale", [0.5, 2.0 ** 20])
def test_sums_near_the_bottom_of_the_range(dot, scale, counted):
    """Products near 2^-128 and below: AVX512_BF16 flushes products and partial sums under 2^-126 to zero. Times a
    large alpha/rank, what is lost shows in weights near 2^-110, and the bound's additive term (`_bf16_tiles.tiny`)
    covers it: the bytes are the definition's."""
    rng = np.random.default_rng(8)
    w = Tensor.from_values(rng.standard_normal((24, 256)) * (2.0 ** -120 if scale < 1 else 2.0 ** -110), "BF16")
    up = Tensor.from_values(rng.standard_normal((24, 16)) * 2.0 ** -60, "BF16")
    down = Tensor.from_values(rng.standard_normal((16, 256)) * 2.0 ** -68, "BF16")
    got = _merge(w, up, down, 1.0, dot, threads=1, scale=scale)
    assert np.array_equal(got, _bits(_definition(w, up, down, scale, 1.0), "BF16"))
    assert counted["tiles"] > 0


@pytest.mark.parametrize("dot", DOTS)
def test_a_subnormal_factor_takes_the_float32_gemm(dot, counted):
    """AVX512_BF16 reads subnormal inputs as zero: a LoRA with one goes through `_certified_tile` instead."""
    w, up, down = _case("BF16", 64, 512, 8)
    down.array[2, 5] = 0x0003  # a subnormal bfloat16
    assert not _bf16_tiles.usable(up.array, down.array) and _bf16_tiles.usable(up.array, down.array[:2])
    got = _merge(w, up, down, 0.8, dot)
    assert np.array_equal(got, _bits(_definition(w, up, down, 0.5, 0.8), "BF16"))
    assert counted["tiles"] == 0


def test_usable_refuses_exactly_the_subnormals():
    """Every bfloat16 bit pattern alone: refused exactly where the exponent is zero and the fraction is not."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    subnormal = ((bits & 0x7F80) == 0) & ((bits & 0x7F) != 0)
    assert subnormal.sum() == 2 * 127
    ok = np.zeros((1, 1), np.uint16)
    assert [_bf16_tiles.usable(b.reshape(1, 1), ok) for b in bits] == list(~subnormal)
    assert [_bf16_tiles.usable(ok, b.reshape(1, 1)) for b in bits[::97]] == list(~subnormal[::97])


def test_machine_code_is_kept_between_processes(tmp_path, monkeypatch):
    """The compiled loop's machine code is kept in the cache folder and loaded by the next process (here: this one
    with its compiled functions forgotten) with no compiling; a torn or altered file is compiled again and replaced;
    where the cache cannot be written, the loop is compiled each time and works the same."""
    monkeypatch.setenv("LORABOX_CACHE_DIR", str(tmp_path / "cache"))
    w, up, down = _case("BF16", 13, 4160, 64, 0.02)
    want = _bits(_definition(w, up, down, 0.5, 0.8), "BF16")
    compiles = []
    real = _bf16_tiles._object
    monkeypatch.setattr(_bf16_tiles, "_object", lambda *args: compiles.append(1) or real(*args))

    def fresh_merge():
        monkeypatch.setattr(certified, "_kernels", {})
        return _merge(w, up, down, 0.8, "fma")

    assert np.array_equal(fresh_merge(), want) and len(compiles) == 1
    [kept] = (tmp_path / "cache").glob("tiles-*.o")
    assert np.array_equal(fresh_merge(), want) and len(compiles) == 1  # loaded
    data = kept.read_bytes()
    kept.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    assert np.array_equal(fresh_merge(), want) and len(compiles) == 2  # refused, compiled again
    assert kept.read_bytes() == data
    kept.write_bytes(data[:-40])  # torn
    assert np.array_equal(fresh_merge(), want) and len(compiles) == 3
    monkeypatch.setenv("LORABOX_CACHE_DIR", str(kept))  # a file: no folder can be made there
    assert np.array_equal(fresh_merge(), want) and len(compiles) == 4
    assert np.array_equal(fresh_merge(), want) and len(compiles) == 5
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [kept.name]  # no temporary file left


def test_which_products(monkeypatch):
    """AVX512_BF16 where the CPU has it, else the float32 GEMM; LORABOX_BF16_TILES overrides."""
    monkeypatch.delenv("LORABOX_BF16_TILES", raising=False)
    assert certified.bf16_dot() == ("bf16" if _bf16_tiles.has_avx512_bf16() else None)
    assert NumpyCompute(1).bf16_dot == certified.bf16_dot()  # what a merge uses by default
    for setting, want in (("0", None), ("fma", "fma"), ("bf16", "bf16")):
        monkeypatch.setenv("LORABOX_BF16_TILES", setting)
        assert certified.bf16_dot() == want
    monkeypatch.setenv("LORABOX_CERTIFY", "0")
    assert NumpyCompute(1).bf16_dot is None


def test_pair_layout():
    """`pack_down` puts row 2q in the low half of each word and row 2q+1 in the high one, an odd rank padded with
    zeros; `pack_up` pairs the same ranks."""
    down = np.arange(3 * 5, dtype=np.uint16).reshape(3, 5)
    packed = _bf16_tiles.pack_down(down)
    assert packed.shape == (2, 5)
    assert np.array_equal(packed & 0xFFFF, down[[0, 2]]) and np.array_equal(packed[0] >> 16, down[1])
    assert not (packed[1] >> 16).any()
    up = np.arange(2 * 3, dtype=np.uint16).reshape(2, 3)
    assert _bf16_tiles.pack_up(up).tolist() == [[0 | 1 << 16, 2], [3 | 4 << 16, 5]]


def test_expect_loads_the_kernels_on_its_own_thread(monkeypatch):
    """`expect` decides that a kept bf16 merge needs no torch without loading numba, and loads the certified tiles'
    kernels (numba's pass first, then the loop) on its compile thread, while the merging thread goes on."""
    calls = []
    real_kernel, real_tiles = certified.kernel, certified.bf16_tiles

    def kernel(dtype):
        calls.append(("kernel", dtype, threading.current_thread().name))
        return real_kernel(dtype)

    def tiles(dot, dtype="BF16"):
        calls.append(("loop", dtype, threading.current_thread().name))
        return real_tiles(dot, dtype)

    monkeypatch.setattr(certified, "kernel", kernel)
    monkeypatch.setattr(certified, "bf16_tiles", tiles)
    w, up, down = _case("F16", 6, 16, 2)
    a = Adapter("unet", "m", tensors={"up": up, "down": down}, alpha=Tensor.scalar(1.0))
    info = type("Info", (), {"name": "x.weight", "dtype": "F16", "shape": (6, 16)})
    c = NumpyCompute(2)
    c.bf16_dot = "fma"
    c.expect([(info, "F16", [Patch(a, 0.8, None, 0)])])
    assert not any(name == threading.current_thread().name for *_, name in calls)
    for thread in threading.enumerate():
        if thread.name.startswith("lorabox-compile"):
            thread.join()
    assert [(what, dtype) for what, dtype, _ in calls] == [("kernel", "F16"), ("loop", "F16")]
    assert all(name.startswith("lorabox-compile") for *_, name in calls)
    assert c.torch is None  # every weight takes the certified tiles
