"""The CPU path's float32 products with a per-element proof (`lorabox.merge.certified`): 16-bit outputs equal
torch's rounding of the float64 definition byte for byte, ties, NaN, infinities and subnormals included, and the
proof is what makes them so (plain float32 products do not)."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import lorabox.merge
from lorabox.lora import Adapter
from lorabox.merge import certified
from lorabox.io.safetensors import read_tensors, write_tensors
from lorabox.merge.compute import NumpyCompute
from lorabox.merge.engine import merge
from lorabox.merge.plan import Patch
from lorabox.tensor import Tensor
from tests.helpers import rand, random_lora
from tests.test_merge import flux_base, write_lora

TORCH = {"BF16": torch.bfloat16, "F16": torch.float16}
INFO = type("Info", (), {"name": "x.weight"})


def _bits(x: np.ndarray, dtype: str) -> np.ndarray:
    """float64 -> dtype's bits as torch's `.to(dtype)` rounds them: the reference."""
    return torch.from_numpy(x).to(TORCH[dtype]).view(torch.int16).numpy().view(np.uint16)


def _definition(w: Tensor, up: Tensor, down: Tensor, scale: float, ratio: float) -> np.ndarray:
    x = up.values() @ down.values()  # up@down, times scale, times ratio, plus W: in float64
    x *= scale
    x *= ratio
    x += w.values()
    return x


def _case(dtype: str, rows=512, cols=2048, rank=32, delta=0.01, seed=5):
    rng = np.random.default_rng(seed)
    w = Tensor.from_values(rng.standard_normal((rows, cols)) * 0.02, dtype)
    up = Tensor.from_values(rng.standard_normal((rows, rank)) * delta, "BF16")
    down = Tensor.from_values(rng.standard_normal((rank, cols)) * delta, "BF16")
    return w, up, down


def _merge(w: Tensor, up: Tensor, down: Tensor, ratio: float, dtype: str, certify=True, threads=2) -> np.ndarray:
    a = Adapter("unet", "m", tensors={"up": up, "down": down}, alpha=Tensor.scalar(up.shape[1] / 2))
    c = NumpyCompute(threads, kernels="torch", certify=certify)
    with c.session():
        return c.process(INFO, w, [Patch(a, ratio, None, 0)], dtype).array.copy().view(np.uint16)


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_the_kernel_is_there(dtype):
    """numba comes with the test install: the tests below run the certified path, not the float64 fallback."""
    assert certified.kernel(dtype) is not None
    assert certified.kernel("F32") is None


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
@pytest.mark.parametrize("delta", [0.003, 0.03])
def test_bytes_are_the_definitions(dtype, delta):
    """bf16 factors with ratio 0.8 put many float64 values on float32 ties: every byte still matches, where the
    fused float64 tiles differ on some of those ties (test_merge_devices)."""
    w, up, down = _case(dtype, delta=delta)
    got = _merge(w, up, down, 0.8, dtype)
    assert np.array_equal(got, _bits(_definition(w, up, down, 0.5, 0.8), dtype))  # alpha = rank / 2


def _direct(dtype, w, up, down, factors):
    """The kernel on one tile covering the whole weight: (output bits, repaired count, the unchecked float32 bits)."""
    fn = certified.kernel(dtype)
    up64, down64 = up.values(), down.values()
    scaled = up64 * np.prod(factors)
    rows, cols = certified.bounds(scaled, down64)
    p = (scaled.astype(np.float32) @ down64.astype(np.float32)).astype(np.float32)
    wb = w.array.view(np.uint16)
    wb.flags.writeable = False
    out = np.zeros(w.shape, np.uint16)
    repaired = fn(p, wb, out, 0, 0, rows, cols, np.ascontiguousarray(up64), np.ascontiguousarray(down64.T),
                  np.array(factors, np.float64))
    plain = torch.from_numpy(w.values32() + p).to(TORCH[dtype]).view(torch.int16).numpy().view(np.uint16)
    return out, repaired, plain


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_the_proof_is_needed_and_repairs_are_exact(dtype):
    """Plain float32 products round some elements differently from the definition; the kernel flags those (and a
    few more) and recomputes them in float64: zero differences, and a small repaired share."""
    w, up, down = _case(dtype, rows=256, cols=1024, delta=0.03, seed=11)
    factors = (0.5, 0.8)
    want = _bits(_definition(w, up, down, *factors), dtype)
    out, repaired, plain = _direct(dtype, w, up, down, factors)
    assert np.count_nonzero(plain != want) > 0  # the test data reaches the cases the proof is for
    assert np.array_equal(out, want)
    assert np.count_nonzero(plain != want) <= repaired < out.size // 50


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_special_values(dtype):
    """NaN (torch's NaN bits), infinities, signed zeros, subnormals, zero rows of `up`, overflow past the format's
    largest value: each element as torch rounds the float64 definition."""
    rng = np.random.default_rng(3)
    rows, cols, rank = 16, 64, 8
    big = 60000.0 if dtype == "F16" else 3.0e38
    tiny = 2.0 ** -20 if dtype == "F16" else 2.0 ** -130  # subnormal in the output format
    values = [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, big, -big, tiny, -tiny, 1.0, -1.0]
    w64 = rng.standard_normal((rows, cols)) * 0.02
    w64.reshape(-1)[: len(values) * 4] = np.repeat(values, 4)
    w = Tensor.from_values(w64, dtype)
    up64 = rng.standard_normal((rows, rank)) * 0.1
    up64[3] = 0.0  # a row with no delta
    up64[0, 0] = 2.0 ** 12 if dtype == "F16" else 2.0 ** 120  # pushes `big` past the largest value
    up = Tensor.from_values(up64, "BF16")
    down = Tensor.from_values(rng.standard_normal((rank, cols)) * 0.1, "BF16")
    factors = (0.75, 0.8)
    with np.errstate(all="ignore"):
        want = _bits(_definition(w, up, down, *factors), dtype)
    out, _, _ = _direct(dtype, w, up, down, factors)
    exp, man = (0x7F80, 0x007F) if dtype == "BF16" else (0x7C00, 0x03FF)

    def nan(bits):
        return ((bits & exp) == exp) & ((bits & man) != 0)

    # NaN bits are torch's own choice and not even one choice (its vectorised bf16 cast writes 0xFFFF, its scalar
    # one 0x7FC0, which lorabox writes): NaN where the definition has NaN, the exact bits everywhere else
    assert np.array_equal(nan(out), nan(want)) and nan(want).reshape(-1)[:8].all()  # W's NaN reached the definition
    keep = ~nan(want)
    assert np.array_equal(out[keep], want[keep]), np.flatnonzero((out != want) & keep)[:10]


def test_float64_tiles_when_asked_or_without_numba(monkeypatch):
    """`certify=False` (LORABOX_CERTIFY=0) and a missing numba both take the float64 tiles, which give the same
    bytes here (a ratio of 0.5 puts no value on a float32 tie)."""
    w, up, down = _case("BF16", rows=256, cols=1024)
    want = _bits(_definition(w, up, down, 0.5, 0.5), "BF16")
    called = []
    real = certified.kernel

    def spy(dtype):
        called.append(dtype)
        return real(dtype)

    monkeypatch.setattr(certified, "kernel", spy)
    assert np.array_equal(_merge(w, up, down, 0.5, "BF16", certify=False), want) and not called
    monkeypatch.setenv("LORABOX_CERTIFY", "0")
    assert np.array_equal(_merge(w, up, down, 0.5, "BF16", certify=None), want) and not called
    monkeypatch.delenv("LORABOX_CERTIFY")
    assert np.array_equal(_merge(w, up, down, 0.5, "BF16", certify=None), want) and called == ["BF16"]
    monkeypatch.setattr(certified, "_kernels", {})
    monkeypatch.delattr(lorabox.merge, "_certified_numba")
    monkeypatch.setitem(sys.modules, "lorabox.merge._certified_numba", None)  # its import fails, as without numba
    assert real("BF16") is None
    assert np.array_equal(_merge(w, up, down, 0.5, "BF16"), want)


def test_a_kept_merge_with_plain_loras_needs_no_torch(tmp_path, monkeypatch):
    """A bf16 base kept in its type, one plain LoRA per weight: every weight takes the certified tiles, so the merge
    decides before it starts (`NumpyCompute.expect`) that it needs no torch, and a fresh `lorabox merge` never
    imports it (about 2 s here). A cast, or an adapter other than a plain LoRA, does start the import. The bytes are
    the numpy path's either way."""
    write_tensors(tmp_path / "base.safetensors", flux_base(np.random.default_rng(0), "BF16"))
    lora = random_lora("flux1", seed=1, every=2, alpha=3.0, text_encoders=False)
    plain = write_lora(tmp_path / "plain.safetensors", lora, "kohya")
    key, ad = next(iter(lora.adapters.items()))
    rng = np.random.default_rng(2)
    rows, n_in = ad.tensors["up"].shape[0], ad.tensors["down"].shape[1]
    lora.adapters[key] = Adapter(ad.component, ad.module, None, {
        "hada_w1_a": rand(rng, (rows, 2)), "hada_w1_b": rand(rng, (2, n_in)),
        "hada_w2_a": rand(rng, (rows, 2)), "hada_w2_b": rand(rng, (2, n_in))}, Tensor.scalar(2.0))
    loha = write_lora(tmp_path / "loha.safetensors", lora, "kohya")

    def run(name, lora_path, dtype, **kw):
        compute = NumpyCompute(**kw)
        merge(tmp_path / "base.safetensors", [(lora_path, 0.8)], tmp_path / f"out_{name}.safetensors", dtype=dtype,
              compute=compute)
        return compute, read_tensors(tmp_path / f"out_{name}.safetensors")[0]

    def fallback(*args, **kw):
        raise AssertionError("a weight left the certified tiles")

    with monkeypatch.context() as m:
        m.setattr(NumpyCompute, "_lora_tile", fallback)
        m.setattr(NumpyCompute, "_lora_blocks_numpy", fallback)
        compute, got = run("auto", plain, "keep")
    assert compute.torch is None
    _, want = run("numpy", plain, "keep", kernels="numpy")
    assert got.keys() == want.keys() and all(got[k].bits_equal(want[k]) for k in want)
    for name, path, dtype in (("cast", plain, "fp16"), ("loha", loha, "keep")):
        compute, other = run(name, path, dtype)
        assert compute.torch is torch, name
        _, reference = run(name + "_numpy", path, dtype, kernels="numpy")
        assert all(other[k].bits_equal(reference[k]) for k in reference), name

    argv = ["lorabox", "merge", str(tmp_path / "base.safetensors"), "--lora", str(plain), "--ratio", "0.8",
            "-o", str(tmp_path / "cli.safetensors"), "--device", "cpu", "--json"]
    code = ("import atexit, os, sys\n"
            "def report():\n    print('torch' in sys.modules, flush=True)\n"
            "atexit.register(report)\n"  # the usual exit, or `run`'s prompt one (numba is loaded):
            "exit_now = os._exit\nos._exit = lambda code: (report(), exit_now(code))\n"
            f"from lorabox.cli import run\nsys.argv = {argv!r}\nrun()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("False")  # torch was not imported
    got = read_tensors(tmp_path / "cli.safetensors")[0]
    assert all(got[k].bits_equal(want[k]) for k in want)
