"""Where a merged tensor is computed: `NumpyCompute` on the CPU (row blocks on every core) or `TorchCompute` on
a CUDA device. Both compute W + sum(ratio * scale * delta) in float64 and round it once the way torch's
`.to(dtype)` rounds a float64 tensor (to float32, then to the output dtype); in the definition's order, so the same
bytes. On the CPU a bf16 or fp16 weight written as itself takes float32 products with a proof per element where
numba is installed (`NumpyCompute._certified_tile`, `lorabox.merge.certified`): the same bytes, faster. Without
numba, and for other 16-bit and fp8 outputs, the CPU path's torch kernels fold the multipliers into the float64
product (`NumpyCompute._lora_tile`: the same rounded value but on exact ties, one element in 2e6 to 1e7).

`make_compute(device)` picks one; `--device cpu` is always the numpy path, which the test suite covers and
against which the torch path is checked byte for byte (run on torch's CPU device where no GPU is present).
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import OutputError
from ..parallel import BufferPool, cpus, run_chunks
from ..tensor import Tensor, storage_dtype
from . import _bf16_tiles, certified
from .math import DeltaCache, apply_bias, apply_weight_block, delta_rows, magnitude, multipliers

FP8 = ("F8_E4M3", "F8_E5M2")
FUSED = ("BF16", "F16")  # outputs (besides fp8) whose tiles may fold the multipliers into the product: _lora_tile
BLOCK_BYTES = 2 << 20  # float64 working set of one row block: cache-sized (measured best on 2 cores)
TILE_BYTES = 4 << 20  # float64 tile of the torch kernels (`_tiles`)
TILE_COLS = 4096
# the compute workers' niceness above the process's: the thread that reads and hashes the base (a sha256 on one
# core, the first merge's slowest serial step) keeps its core when the workers want both (docs/benchmarks.md,
# eighteenth session); LORABOX_COMPUTE_NICE overrides
COMPUTE_NICE = 10
FP8_STEP = 1 << 22  # elements per device step of the stochastic fp8 rounding (even; temporaries of 32-128 MB)
DEVICES = ("auto", "cpu", "cuda")


def make_compute(device: str = "auto"):
    """`auto`: CUDA when an NVIDIA driver and a CUDA build of torch are present, else the CPU. `cuda` (or
    `cuda:N`) requires them. torch is imported only when a GPU may be there (it costs 1.5 s to import)."""
    if device == "cpu":
        return NumpyCompute()
    if device == "auto":
        if not Path("/proc/driver/nvidia").exists():
            return NumpyCompute()
        try:
            import torch
        except ImportError:
            return NumpyCompute()
        return TorchCompute("cuda") if torch.cuda.is_available() else NumpyCompute()
    if not device.startswith("cuda"):
        raise OutputError(f"unknown --device {device!r}.", hint="Use auto, cpu or cuda.")
    try:
        import torch
    except ImportError:
        raise OutputError("--device cuda needs torch.", hint="pip install 'lorabox[torch]' with a CUDA build of "
                                                            "torch, or use --device cpu.") from None
    if not torch.cuda.is_available():
        raise OutputError("--device cuda: torch sees no CUDA device.", hint="Use --device cpu (same result).")
    return TorchCompute(device)


def from_float32(f32: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "F32":
        return f32
    if dtype == "F16":
        with np.errstate(over="ignore"):  # beyond 65504 is inf, as torch's cast gives
            return f32.astype(np.float16)
    if dtype == "F64":
        return f32.astype(np.float64)
    return Tensor.from_values(f32, dtype).array


def round_to(w: np.ndarray, dtype: str) -> Tensor:
    """float64 -> dtype the way torch's `.to(dtype)` does it (through float32, round-to-nearest-even)."""
    if dtype == "F64":
        return Tensor(w, "F64")
    return Tensor(from_float32(w.astype(np.float32), dtype), dtype)


def round_fp8_merged(name: str, f32: np.ndarray, dtype: str, rounding: str, patched: bool, threads: int = 1,
                     pool=None) -> Tensor:
    """fp8 from float32, rounded once as a whole tensor so that stochastic rounding depends only on (key,
    values); untouched weights are always rounded to nearest. Segments run on `pool` (same bits)."""
    from ..quant.fp8 import round_fp8, seed_for_key

    stochastic = patched and rounding == "stochastic"
    return Tensor(round_fp8(f32, dtype, stochastic=stochastic, seed=seed_for_key(name) if stochastic else None,
                            threads=threads, pool=pool), dtype)


def _torch_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def _start_torch_import():
    """A Future of torch's import, run on its own thread (it takes about 2 s here; `NumpyCompute.expect` starts it
    while the merge gets ready), or the module where it is already imported."""
    import sys

    if "torch" in sys.modules:
        return _import_torch()
    # the executor's thread is joined at exit: a process that stops early (a bad input) waits for the import to end
    # rather than tearing down the interpreter under torch's C++ initialisation
    ex = ThreadPoolExecutor(1, thread_name_prefix="lorabox-import")
    future = ex.submit(_import_torch)
    ex.shutdown(wait=False)
    return future


def _import_torch():
    import warnings

    import torch

    # base tensors are read-only maps of the file; torch only ever reads them
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    return torch


_LATER = "later"  # NumpyCompute._torch before `expect` has said whether this merge uses torch


class NumpyCompute:
    """The CPU path: float64 row blocks of about BLOCK_BYTES, spread over the CPUs this process may use. A single
    LoRA on a whole weight (the common case) runs in tiles of TILE_BYTES instead: for a bf16 or fp16 weight kept in
    its type, where numba is installed, float32 products on numpy's BLAS and one compiled pass that proves or
    repairs each element (`_certified_tile`); otherwise, with torch installed, float64 products on torch's BLAS
    (MKL) and its vectorised casts for the rounding (`_lora_tile`). Everything else, and every tensor of a core
    install (`kernels="numpy"` too), runs on numpy. For float32 and float64 outputs the bytes are the same either
    way (tested): products of bf16/fp16 factors are exact in float64, and so are their sums unless the factors span
    more than about 2^30, so the BLAS's summation order does not show in the rounded output. For other 16-bit and
    fp8 outputs the float64 tiles fold the multipliers into the product, which differs on exact rounding ties only
    (see `_lora_tile`); the certified tiles do not.

    torch takes about 2 s to import here, so a merge says first what it will compute (`expect`) and torch is
    imported only if some tensor will run on its kernels: a bf16 or fp16 merge kept in its type, with one plain
    LoRA per weight, needs none."""

    name = "cpu"

    def __init__(self, threads: int | None = None, kernels: str = "auto", certify: bool | None = None):
        self.threads = cpus() if threads is None else threads
        self.kernels = kernels  # auto | torch | numpy: see the class's docstring
        # float32 products with a proof per element for 16-bit outputs, where numba is installed (`certified`);
        # LORABOX_CERTIFY=0 keeps every tile in float64 (the benchmarks' A/B)
        self.certify = os.environ.get("LORABOX_CERTIFY", "1") != "0" if certify is None else certify
        self._bf16_dot = _LATER  # `bf16_dot`, asked for when a weight could use it (llvmlite's import: 0.1 s)
        self.buffers = BufferPool()
        self.pool = None  # worker threads, during a session
        self._tile_buffers = threading.local()  # one float64 tile buffer per worker thread
        installed = kernels in ("auto", "torch") and _torch_installed()
        if kernels == "torch" and not installed:
            raise OutputError("the torch CPU kernels need torch.", hint="pip install 'lorabox[torch]'.")
        # kernels="torch": imported now; "auto": when `expect` finds a use for it (or on first use, without one)
        self._torch = (_start_torch_import() if kernels == "torch" else _LATER) if installed else None

    @property
    def bf16_dot(self) -> str | None:
        """How the compiled loop of `_bf16_tile` forms its products here (`certified.bf16_dot`), or None: not used."""
        if self._bf16_dot is _LATER:
            self._bf16_dot = certified.bf16_dot() if self.certify else None
        return self._bf16_dot

    @bf16_dot.setter
    def bf16_dot(self, dot: str | None) -> None:
        self._bf16_dot = dot

    @property
    def torch(self):
        """torch, once its import is done (the first use waits for it; `session` makes that use), or None where it is
        not installed, not wanted (`kernels="numpy"`) or not needed by this merge (`expect`)."""
        if self._torch is _LATER:
            self._torch = _import_torch()
        if isinstance(self._torch, Future):
            self._torch = self._torch.result()
        return self._torch

    def expect(self, jobs) -> None:
        """Before a merge: `jobs`, the (TensorInfo, output dtype, patches) of each tensor to come, or None when they
        are not known. torch's import starts (on its own thread) if some tensor will run on its kernels; if none
        will, this merge does without it (a tensor whose need was not foreseen would take the numpy path: the
        definition's bytes, slower). The certified tiles' compiled code is loaded on a thread of its own too (numba's
        pass from its disk cache, 0.4 s with numba's import; `_bf16_tile`'s loop, 1 ms from lorabox's cache or 0.7 s
        of LLVM), for the formats of the 16-bit weights that take them, while the base starts streaming."""
        formats = {dtype for info, dtype, patches in jobs or () if patches and len(info.shape) > 1
                   and _single_lora(patches) and self._certifies(info.dtype, dtype, True)}
        if formats:
            ex = ThreadPoolExecutor(1, thread_name_prefix="lorabox-compile")
            ex.submit(self._load_kernels, sorted(formats))
            ex.shutdown(wait=False)
        if self.kernels != "auto" or self._torch not in (_LATER, None) or not _torch_installed():
            return
        uses = jobs is None or any(self._uses_torch(*job) for job in jobs)
        self._torch = _start_torch_import() if uses else None

    def _load_kernels(self, formats: list[str]) -> None:
        for dtype in formats:  # what every such weight runs first
            certified.kernel(dtype)
        if self.bf16_dot:
            for dtype in formats:  # one LLVM module holds both formats; each has its numba repair pass
                certified.bf16_tiles(self.bf16_dot, dtype)

    def _uses_torch(self, info, dtype: str, patches: list) -> bool:
        """Whether `process(info, ..., dtype)` runs on torch's kernels: big casts and float64 tiles, not the small
        tensors (biases), fp8 rounding or the certified tiles."""
        if not patches:
            return dtype != info.dtype and dtype in TORCH_FLOATS  # a cast (`_round`)
        if info.name.endswith(".bias") or len(info.shape) == 1:
            return False  # a few thousand values: numpy rounds them as torch does
        target, fused = ("F32", True) if dtype in FP8 else (dtype, dtype in FUSED)
        return not (_single_lora(patches) and self._certifies(info.dtype, target, fused))

    def _certifies(self, t_dtype: str, dtype: str, fused: bool) -> bool:
        """Whether a weight of `t_dtype` written as `dtype` takes the certified tiles, asked without loading numba
        (`_finisher` loads it). Where numba is installed but cannot compile here, such weights take the numpy path."""
        return (self.certify and fused and t_dtype == dtype and self.kernels != "numpy" and dtype in certified.HALF
                and certified.installed())

    def _finisher(self, t_dtype: str, dtype: str, fused: bool):
        """The compiled pass of the certified tiles for a weight of `t_dtype` written as `dtype`, or None."""
        return certified.kernel(dtype) if self._certifies(t_dtype, dtype, fused) else None

    def session(self):
        """Around a whole merge: one worker thread per CPU, kept for the merge, each running BLAS (OpenBLAS, and
        torch's MKL) on one thread. Tiles are already spread over the cores; BLAS threads on top oversubscribe them,
        and their spinning runs the products several times slower on a busy 2-core machine (measured: 2.2 s instead
        of 0.33 s of CPU for one 3072x12288 rank-64 weight with OpenBLAS; 6.1 instead of 4.1 CPU-s for 300 SDXL
        weights with MKL, whose OpenMP thread count is set per thread, so each worker sets its own). The workers
        run COMPUTE_NICE nicer than the rest, so that the reading, hashing and writing threads are never queued
        behind them."""
        from threadpoolctl import threadpool_limits

        torch = self.torch  # waits for the import, so that threadpoolctl finds torch's BLAS loaded
        stack = contextlib.ExitStack()
        stack.enter_context(threadpool_limits(limits=1, user_api="blas"))
        if torch is not None:
            stack.callback(torch.set_num_threads, torch.get_num_threads())
            torch.set_num_threads(1)
        nice = int(os.environ.get("LORABOX_COMPUTE_NICE", str(COMPUTE_NICE)))

        def setup():
            if torch is not None:
                torch.set_num_threads(1)
            if nice:  # Linux: a thread's own niceness (raising it needs no privilege)
                with contextlib.suppress(OSError, AttributeError):
                    tid = threading.get_native_id()
                    os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))

        if self.threads > 1:
            self.pool = stack.enter_context(ThreadPoolExecutor(
                self.threads, thread_name_prefix="lorabox-compute", initializer=setup))
            stack.callback(setattr, self, "pool", None)
        return stack

    def process(self, info, t: Tensor, patches: list, dtype: str, rounding: str = "nearest") -> Tensor:
        if dtype in FP8:
            f32 = t.values32() if not patches else self._patched(info, t, patches, "F32", fused=True)
            return round_fp8_merged(info.name, f32, dtype, rounding, bool(patches), self.threads, self.pool)
        if not patches:
            return t if dtype == t.dtype else Tensor(self._round(t.values(), dtype), dtype)
        return Tensor(self._patched(info, t, patches, dtype, fused=dtype in FUSED), dtype)

    def scaled_fp8(self, info, t: Tensor, patches: list, dtype: str, stochastic: bool) -> tuple[np.ndarray, np.ndarray]:
        """`t` patched, as float32, quantized to ComfyUI scaled fp8 with its scale recomputed (amax / max):
        (bits, scale), as `fp8.quantize_scaled` gives them."""
        from ..quant.fp8 import quantize_scaled, seed_for_key

        f32 = self.process(info, t, patches, "F32").array if patches else t.values32()
        return quantize_scaled(f32, dtype, stochastic=stochastic, seed=seed_for_key(info.name) if stochastic else None,
                               threads=self.threads, pool=self.pool)

    def gguf(self, info, t: Tensor, patches: list, qtype: str, stored_shape) -> np.ndarray:
        """`t` patched, as float32, encoded as the GGUF type `qtype` in `stored_shape`: what `GGUFStreamWriter.write`
        takes (block bytes, or the float16/bfloat16/float32 array); the block quantizers run on the workers."""
        return _gguf_on_host(self, info, t, patches, qtype, stored_shape)

    def requantize(self, info, raw: np.ndarray, patches: list) -> np.ndarray:
        """A GGUF base tensor (`info`: its `io.gguf.GGUFTensor`; `raw`: its bytes) decoded, patched and encoded
        again in its own type, as `gguf` encodes; the block decoders and quantizers run on the workers."""
        return _requantize_on_host(self, info, raw, patches)

    def _patched(self, info, t: Tensor, patches: list, dtype: str, fused: bool) -> np.ndarray:
        if info.name.endswith(".bias") or t.ndim == 1:
            return self._round(apply_bias(t.values(), patches), dtype)
        return self._rows(t, patches, dtype, fused)

    def _round(self, w64: np.ndarray, dtype: str) -> np.ndarray:
        """float64 -> dtype as torch's `.to(dtype)` rounds (through float32)."""
        if self.torch is None or dtype not in TORCH_FLOATS:
            return round_to(w64, dtype).array
        torch = self.torch
        return _from_torch(torch, torch.from_numpy(np.ascontiguousarray(w64)).to(_torch_dtype(torch, dtype)), dtype)

    def _rows(self, t: Tensor, patches: list, dtype: str, fused: bool = False) -> np.ndarray:
        rows = t.shape[0]
        step = max(1, BLOCK_BYTES // max(1, int(np.prod(t.shape[1:])) * 8))
        out = self.buffers.empty(t.shape, storage_dtype(dtype))
        cache = DeltaCache()
        for p in patches:  # decode shared factors once, before the blocks run in parallel
            cache.warm(p.adapter)
        p = patches[0]
        a = p.adapter
        simple = _single_lora(patches)
        finish = self._finisher(t.dtype, dtype, fused) if simple else None
        floats = t.dtype in TORCH_FLOATS and dtype in TORCH_FLOATS
        torch = self.torch if simple and finish is None and floats else None
        if finish is not None or torch is not None:
            tile = self._bf16_tile(t, a, p.ratio, cache, out, finish) if finish is not None else None
            align = 16 if tile is not None else 1  # its column blocks: only the weight's last columns need the tail
            if tile is None:
                tile = (self._certified_tile(t, a, p.ratio, cache, out, finish) if finish is not None
                        else self._lora_tile(t, a, p.ratio, cache, out, dtype, fused))
            run_chunks(tile, _tiles(rows, int(np.prod(t.shape[1:])), align), self.threads, self.pool)
            return out
        if simple:
            block = self._lora_blocks_numpy(t, a, p.ratio, cache, out, dtype, step)
        else:
            def block(r0: int) -> None:
                rs = slice(r0, min(rows, r0 + step))
                out[rs] = self._round(apply_weight_block(t[rs].values(), rs, patches, cache), dtype)

        run_chunks(block, range(0, rows, step), self.threads, self.pool)
        return out

    def _lora_tile(self, t: Tensor, a, ratio: float, cache: DeltaCache, out: np.ndarray, dtype: str,
                   fused: bool):
        """One LoRA on a whole weight, on torch's CPU kernels, by (rows, columns) tile into a float64 buffer kept
        per worker thread, then torch's rounding written straight into the output.

        `fused`: W is widened into the buffer and one BLAS call adds ratio*scale * up@down to it (addmm, beta=1):
        no separate passes for the multiplies and the add (scripts/bench_fused_ties.py, FLUX.1-shaped weights, one
        thread: 7.3 -> 5.8 ns per element at rank 64, 5.3 -> 4.0 at rank 32, bf16). MKL folds the
        multiplier into `up` and adds the products into W one by one, so the float64 sum may differ from the
        definition's order (up@down, times scale, times ratio, plus W) in its last bits. That shows after the
        rounding only where the value sits on a tie of both roundings (float32, then the output's): bf16 factors
        with a ratio such as 0.8 put values exactly on float32 ties, and then about one element in 1e7 (bf16) or
        2e6 (fp16) comes out one unit apart (scripts/bench_fused_ties.py). Both are the float64 value rounded once;
        16-bit and fp8 outputs use this, float32 and float64 outputs keep the definition's order."""
        torch = self.torch
        rows = t.shape[0]
        down = torch.from_numpy(cache.down(a))
        up = torch.from_numpy(a.tensors["up"].values().reshape(rows, -1))  # decoded once, not per tile
        factors = multipliers(a.scale, ratio)
        alpha = math.prod(factors)
        w_all = _to_torch(torch, t).reshape(rows, -1)
        out_all = _to_torch(torch, Tensor(out, dtype)).reshape(rows, -1)
        local = self._tile_buffers

        def tile(rc: tuple[slice, slice]) -> None:
            rs, cs = rc
            w = w_all[rs, cs]
            d = _buffer(torch, local, "buf", w.numel(), torch.float64).view(w.shape)
            if w.dtype == torch.float16:  # torch has no vectorised float16 -> float64: through a kept float32
                # buffer (0.17 + 0.37 ns per element; a fresh float32 tensor per tile was 1.4; scripts/bench_tiles.py
                # --model sdxl --rank 32 --tiles 4096:4, both cores: 4.55-4.66 -> 4.23-4.52 ns per element)
                w = _buffer(torch, local, "buf32", w.numel(), torch.float32).view(w.shape).copy_(w)
            if fused:
                d.copy_(w)
                d.addmm_(up[rs], down[:, cs], alpha=alpha)
            else:
                torch.mm(up[rs], down[:, cs], out=d)
                for f in factors:
                    d *= f
                d += w
            out_all[rs, cs] = d  # float64 -> float32 -> dtype, as .to(dtype) rounds

        return tile

    def _certified_tile(self, t: Tensor, a, ratio: float, cache: DeltaCache, out: np.ndarray, finish,
                        proof: _Proof | None = None):
        """The same tiles with the product in float32 and a proof per element (`lorabox.merge.certified`): one float32
        BLAS call per tile (numpy's OpenBLAS: as fast as torch's MKL on these shapes here, and no torch to import),
        then one compiled pass that adds W, rounds, checks and repairs the few elements the check cannot vouch for.
        The definition's bytes, ties included, whichever BLAS computes the products."""
        proof = _Proof(t, a, ratio, cache, out) if proof is None else proof
        lhs, rhs = (proof.up * proof.s).astype(np.float32), proof.down.astype(np.float32)
        local = self._tile_buffers

        def tile(rc: tuple[slice, slice]) -> None:
            rs, cs = rc
            shape = (rs.stop - rs.start, cs.stop - cs.start)
            p = _buffer(np, local, "p32", shape[0] * shape[1], np.float32).reshape(shape)
            np.matmul(lhs[rs], rhs[:, cs], out=p)
            finish(p, proof.w_all, proof.out_all, rs.start, cs.start, proof.row_bound[rs], proof.col_bound[cs],
                   proof.up[rs], proof.down_t, proof.factors)

        return tile

    def _bf16_tile(self, t: Tensor, a, ratio: float, cache: DeltaCache, out: np.ndarray, finish):
        """The certified tiles in one compiled loop (`_bf16_tiles`) for a bfloat16 or float16 weight kept in its type
        with bfloat16 `up` and `down`: no float32 product in memory, products twice as fast on AVX512_BF16. None where
        that does not apply (other types, a denormal factor, no kernel here). Columns past the last multiple of 16
        take `_certified_tile`; the flagged elements are repaired in float64 as there."""
        up_t, down_t16 = a.tensors["up"], a.tensors["down"]
        if not (t.dtype in ("BF16", "F16") and up_t.dtype == "BF16" and down_t16.dtype == "BF16" and self.bf16_dot):
            return None
        rows = t.shape[0]
        up_bits, down_bits = up_t.array.reshape(rows, -1), down_t16.array.reshape(down_t16.shape[0], -1)
        compiled = certified.bf16_tiles(self.bf16_dot, t.dtype)
        if compiled is None or not _bf16_tiles.usable(up_bits, down_bits):
            return None
        fn, repair = compiled
        proof = _Proof(t, a, ratio, cache, out)
        packed_up, packed_down = _bf16_tiles.pack_up(up_bits), _bf16_tiles.pack_down(down_bits)
        k_pairs, ldd = packed_up.shape[1], packed_down.shape[1]
        s, tiny = np.float32(proof.s), _bf16_tiles.tiny(proof.s, proof.down.shape[0])
        w_all, out_all = proof.w_all, proof.out_all
        cols = w_all.shape[1]
        tail = self._certified_tile(t, a, ratio, cache, out, finish, proof) if cols % 16 else None
        local = self._tile_buffers

        def tile(rc: tuple[slice, slice]) -> None:
            rs, cs = rc
            n_rows, width = rs.stop - rs.start, (cs.stop - cs.start) // 16 * 16
            if width:
                masks = _buffer(np, local, "masks", n_rows * width // 16, np.uint16).reshape(n_rows, width // 16)
                at = rs.start * cols + cs.start
                fn(packed_up[rs].ctypes.data, k_pairs, packed_down[:, cs.start:].ctypes.data, ldd,
                   w_all.ctypes.data + 2 * at, cols, out_all.ctypes.data + 2 * at, cols, masks.ctypes.data,
                   width // 16, proof.row_bound[rs].ctypes.data, proof.col_bound[cs].ctypes.data, s, tiny,
                   n_rows, width)
                if masks.any():
                    repair(masks, w_all, out_all, rs.start, cs.start, proof.up[rs], proof.down_t, proof.factors)
            if width < cs.stop - cs.start:
                tail((rs, slice(cs.start + width, cs.stop)))

        return tile

    def _lora_blocks_numpy(self, t: Tensor, a, ratio: float, cache: DeltaCache, out: np.ndarray, dtype: str,
                           step: int):
        """The same on numpy alone: W + delta in float64, rounded to float32, then to `dtype`."""
        rows = t.shape[0]

        def block(r0: int) -> None:
            rs = slice(r0, min(rows, r0 + step))
            w = t[rs]
            d = delta_rows(a, rs, cache, ratio)
            src = w.array if w.dtype in ("F32", "F64") else w.values32()  # exact for every float
            sum32 = np.add(src, d.reshape(src.shape), out=np.empty(src.shape, np.float32), casting="unsafe",
                           dtype=np.float64)
            out[rs] = from_float32(sum32, dtype)

        return block


class _Proof:
    """What the certified tiles of one weight share, computed once: `up` in float64 (the repairs read it), `down`
    and its transpose, the multipliers and their product `s`, the bound's row and column factors
    (`certified.bounds`), and W and the output as 16-bit bits."""

    def __init__(self, t: Tensor, a, ratio: float, cache: DeltaCache, out: np.ndarray):
        rows = t.shape[0]
        self.down = cache.down(a)
        self.up = a.tensors["up"].values().reshape(rows, -1)  # a new float64 array: its own
        factors = multipliers(a.scale, ratio)
        self.s = math.prod(factors)
        self.factors = np.array(factors, dtype=np.float64)
        self.row_bound, self.col_bound = certified.bounds(self.up * self.s, self.down)
        self.down_t = np.ascontiguousarray(self.down.T)
        self.w_all = t.array.reshape(rows, -1).view(np.uint16)
        self.w_all.flags.writeable = False  # one compiled variant: base weights are read-only maps anyway
        self.out_all = out.reshape(rows, -1).view(np.uint16)


def _gguf_on_host(compute, info, t: Tensor, patches: list, qtype: str, stored_shape) -> np.ndarray:
    from ..io.gguf import encode

    if not patches and qtype == t.dtype and qtype in ("F32", "F16", "BF16"):
        return t.array  # kept as it is
    values = compute.process(info, t, patches, "F32").array if patches else t.values32()
    return encode(values, qtype, stored_shape, pool=compute.pool)


def _requantize_on_host(compute, info, raw: np.ndarray, patches: list) -> np.ndarray:
    from ..io.gguf import decode

    values = Tensor(decode(raw, info.qtype, info.stored_shape, pool=compute.pool).reshape(info.shape), "F32")
    return compute.gguf(info, values, patches, info.qtype, info.stored_shape)


def _weight_math(info, shape: tuple, patches: list) -> bool:
    """Whether a weight's merge is a matrix product (the GPU path runs it on the device), not a copy, cast or bias."""
    return bool(patches) and not (info.name.endswith(".bias") or len(shape) == 1)


def _buffer(lib, local: threading.local, name: str, n: int, dtype):
    """The first `n` elements of a flat buffer kept per worker thread (at least a tile's worth): a torch tensor or,
    with `lib` numpy, an array."""
    buf = getattr(local, name, None)
    if buf is None or len(buf) < n:
        buf = lib.empty(max(n, TILE_BYTES // 8), dtype=dtype)
        setattr(local, name, buf)
    return buf[:n]


def _single_lora(patches: list) -> bool:
    """One plain LoRA on the weight (up @ down: no Tucker mid, DoRA magnitude, row map or full diff): the tiles."""
    a = patches[0].adapter
    return (len(patches) == 1 and patches[0].row_map is None and magnitude(a) is None and a.kind == "lora"
            and "mid" not in a.tensors and "diff" not in a.tensors)


def _tiles(rows: int, cols: int, align: int = 1) -> list[tuple[slice, slice]]:
    """float64 tiles of about TILE_BYTES of a rows x cols product, at most TILE_COLS wide: each BLAS call packs the
    `down` columns and `up` rows it needs, so a tile of few rows packs as much as it computes (measured on a
    3072x12288 rank-64 weight: 5.8 ns per element as row blocks of 21 rows, 4.7-4.8 as 2 MB tiles). With the
    multipliers folded into the product (`_lora_tile`), 4 MB tiles beat 2 MB ones on both cores, best of four
    interleaved runs: FLUX.1's weights 2.32 -> 2.07 ns per element of wall time at rank 64, 1.47 -> 1.29 at rank
    32; SDXL's 1.80 -> 1.71 at rank 32 (fp16). 8 MB ran as 4; 512-2048 wide no better than 4096. Widths are
    multiples of `align` but for the last tile's."""
    n_cols = -(-cols // TILE_COLS)
    width = -(-cols // n_cols)
    width = -(-width // align) * align
    step = max(1, TILE_BYTES // (width * 8))
    return [(slice(r, min(rows, r + step)), slice(c, min(cols, c + width)))
            for r in range(0, rows, step) for c in range(0, cols, width)]


TORCH_FLOATS = ("BF16", "F16", "F32", "F64")


def _torch_dtype(torch, dtype: str):
    return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}[dtype]


def _to_torch(torch, t: Tensor):
    """A 16/32/64-bit float Tensor as a torch tensor sharing its memory."""
    return _torch_view(torch, np.ascontiguousarray(t.array), t.dtype)


def _torch_view(torch, a: np.ndarray, dtype: str):
    """A torch tensor over the memory of `a`, the numpy array lorabox stores for `dtype` (bfloat16 as uint16 bits,
    fp8 as uint8 bits: their torch view is uint8)."""
    return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if dtype == "BF16" else torch.from_numpy(a)


def _from_torch(torch, x, dtype: str) -> np.ndarray:
    """A CPU torch tensor as the numpy array lorabox stores for `dtype` (bfloat16 as its uint16 bits)."""
    return x.view(torch.int16).numpy().view(np.uint16) if dtype == "BF16" else x.numpy()


class TorchCompute:
    """The GPU path: the whole weight in float64 on the device, the same operations in the same order as
    `NumpyCompute`, and torch's own rounding (to float32, then to the output dtype). fp8 rounding runs on the
    device too, ComfyUI scaled fp8's included: nearest as torch's cast, stochastic from the CPU path's PCG64 stream
    (made on the device) with the same integer steps, so the bytes do not depend on the device. GGUF block
    quantization too (`gguf`: `lorabox.quant.gguf_torch`, the CPU path's steps); only the blocks come back."""

    def __init__(self, device: str = "cuda"):
        import warnings

        import torch

        # base tensors arrive as read-only buffers; they are only ever copied to the device, never written
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

        self.torch = torch
        self.device = torch.device(device)
        self.name = str(self.device)
        self.cpu = NumpyCompute()
        self.cpu.expect(None)  # torch is here already: its casts for the tensors that stay on the host

    def expect(self, jobs) -> None:
        """As `NumpyCompute.expect`: torch is imported already."""

    def session(self):
        return self.cpu.session()

    @property
    def pool(self):
        """The CPU worker pool of the session: GGUF types the device does not handle are encoded there."""
        return self.cpu.pool

    def process(self, info, t: Tensor, patches: list, dtype: str, rounding: str = "nearest") -> Tensor:
        if not _weight_math(info, t.shape, patches):
            return self.cpu.process(info, t, patches, dtype, rounding)  # copies, casts and biases: no math
        w = self._merged(t, patches)
        if dtype == "F64":
            return Tensor(self._host(w, "F64"), "F64")
        f32 = w.to(self.torch.float32)
        del w
        if dtype in FP8:
            return Tensor(self._fp8(info.name, f32, dtype, stochastic=rounding != "nearest"), dtype)
        return Tensor(self._to_numpy(f32, dtype), dtype)

    def scaled_fp8(self, info, t: Tensor, patches: list, dtype: str, stochastic: bool) -> tuple[np.ndarray, np.ndarray]:
        """`NumpyCompute.scaled_fp8` on the device: amax found there, the scale and its reciprocal computed on the
        host as `fp8.quantize_scaled` computes them, the float32 product and the rounding on the device."""
        from ..quant.fp8 import reciprocal, scale_for_amax

        if not patches:
            return self.cpu.scaled_fp8(info, t, patches, dtype, stochastic)
        f32 = self._merged(t, patches).to(self.torch.float32)
        scale = scale_for_amax(self.torch.maximum(f32.max(), -f32.min()).item(), dtype)
        f32 *= float(reciprocal(scale))  # float32 * float32, rounded once, as numpy's
        return self._fp8(info.name, f32, dtype, stochastic), scale

    def gguf(self, info, t: Tensor, patches: list, qtype: str, stored_shape) -> np.ndarray:
        """`NumpyCompute.gguf` with the block quantization on the device, untouched weights' included (2 bytes per
        parameter go there, at most 1.07 come back); float16/bfloat16/float32 outputs are cast on the host."""
        from ..quant.gguf_quants import QTYPES
        from ..quant.gguf_torch import quantize

        if qtype not in QTYPES:
            return _gguf_on_host(self, info, t, patches, qtype, stored_shape)
        torch = self.torch
        if _weight_math(info, t.shape, patches):
            f32 = self._merged(t, patches).to(torch.float32)
        else:
            src = self.cpu.process(info, t, patches, "F32") if patches else t
            x = _to_torch(torch, src) if src.dtype in TORCH_FLOATS else torch.from_numpy(src.values32())
            f32 = x.to(self.device).to(torch.float32)
        return self._host(quantize(f32.reshape(tuple(stored_shape)), qtype), "U8")

    def requantize(self, info, raw: np.ndarray, patches: list) -> np.ndarray:
        """`NumpyCompute.requantize` with the blocks decoded on the device too: a patched weight goes there as its
        blocks (0.56-1.07 bytes per parameter rather than 4 as float32) and comes back as blocks. Float-typed
        tensors and types lorabox does not encode go the host's way (their merge still runs here)."""
        from ..quant import gguf_torch
        from ..quant.gguf_quants import QTYPES

        if info.qtype not in QTYPES or not _weight_math(info, info.shape, patches):
            return _requantize_on_host(self, info, raw, patches)
        torch = self.torch
        f32 = gguf_torch.dequantize(torch.from_numpy(raw).to(self.device), info.qtype, info.stored_shape)
        w = self._patch(f32.reshape(tuple(info.shape)).to(torch.float64), patches)
        return self._host(gguf_torch.quantize(w.to(torch.float32).reshape(tuple(info.stored_shape)), info.qtype), "U8")

    # -- float64 on the device -------------------------------------------------------------------------------
    def _dev(self, t: Tensor):
        """A Tensor's values as float64 on the device (16-bit floats are moved as 16 bits, then widened)."""
        torch = self.torch
        x = _to_torch(torch, t) if t.dtype in TORCH_FLOATS else torch.from_numpy(t.values())
        return x.to(self.device).to(torch.float64)

    def _delta(self, a, ratio: float):
        torch = self.torch
        ts = a.tensors
        if a.kind == "lora" and "mid" not in ts:
            up, down = self._dev(ts["up"]), self._dev(ts["down"])
            d = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(up.shape[0],
                                                                                        *down.shape[1:])
            if "diff" not in ts:  # the CPU path's multiplies, so the float64 values are the same
                for f in multipliers(a.scale, ratio):
                    d *= f
                return d
            if a.scale != 1.0:
                d *= a.scale
            d += self._dev(ts["diff"]).reshape(d.shape)
            if ratio != 1.0:
                d *= ratio
            return d
        full = a.delta()  # LoHa, LoKr, Tucker, diff-only: the float64 definition, computed once on the CPU
        return None if full is None else ratio * torch.from_numpy(np.ascontiguousarray(full)).to(self.device)

    def _merged(self, t: Tensor, patches: list):
        return self._patch(self._dev(t), patches)

    def _patch(self, w, patches: list):
        """The float64 device weight `w` with `patches` applied, in place (the CPU path's order)."""
        torch = self.torch
        for p in patches:
            d = self._delta(p.adapter, p.ratio)
            if p.row_map is None:
                sel, target = None, w
                idx = None
            else:
                keep = np.flatnonzero(p.row_map >= 0)
                if not len(keep):
                    continue
                sel = torch.from_numpy(keep).to(self.device)
                idx = torch.from_numpy(p.row_map[keep]).to(self.device)
                target = w[sel]
            if d is not None:
                if idx is not None:
                    d = d[idx]
                if d.numel() != target.numel():
                    from ..errors import ShapeMismatch

                    raise ShapeMismatch(f"{p.adapter.module}: the LoRA's delta has {d[0].numel()} inputs per row, "
                                        f"the base weight {target[0].numel()}: a LoRA for another model size.")
                target += d.reshape(target.shape)
            m = magnitude(p.adapter)
            if m is not None:
                mag = torch.from_numpy(np.ascontiguousarray(m)).to(self.device)
                if idx is not None:
                    mag = mag[idx]
                flat = target.reshape(target.shape[0], -1)
                flat *= (mag / torch.linalg.vector_norm(flat, dim=1))[:, None]
            if sel is not None:
                w[sel] = target
        return w

    # -- rounding ----------------------------------------------------------------------------------------------
    def _host(self, x, dtype: str) -> np.ndarray:
        """A device tensor (holding `dtype`'s values: fp8 as uint8 bits) copied into a recycled host array
        (`NumpyCompute.buffers`). A fresh array (`.cpu()`) is fresh memory, every page faulted in on first touch:
        about 1 GB/s on the H100 machine, where recycling took a FLUX.1 merge from 29 to 18 s (docs/benchmarks.md)."""
        out = self.cpu.buffers.empty(tuple(x.shape), storage_dtype(dtype))
        view = _torch_view(self.torch, out, dtype)
        view.copy_(x)
        return out

    def _to_numpy(self, f32, dtype: str) -> np.ndarray:
        return self._host(f32.to(_torch_dtype(self.torch, dtype)), dtype)

    def _fp8(self, name: str, f32, dtype: str, stochastic: bool) -> np.ndarray:
        return self._fp8_stochastic(name, f32, dtype) if stochastic else self._fp8_nearest(f32, dtype)

    def _fp8_stochastic(self, name: str, f32, dtype: str) -> np.ndarray:
        """lorabox.quant.fp8's stochastic rounding on the device: the same PCG64 draws, made there
        (`pcg64_torch.draws`), and the same integer steps, so the same bits as the CPU path."""
        from ..quant.fp8 import seed_for_key, stochastic_bits_torch
        from ..quant.pcg64_torch import draws

        torch = self.torch
        flat = f32.reshape(-1)
        n, seed = flat.numel(), seed_for_key(name)
        out = torch.empty(n, dtype=torch.uint8, device=self.device)
        for s in range(0, n, FP8_STEP):
            m = min(FP8_STEP, n - s)
            out[s:s + m] = stochastic_bits_torch(torch, flat[s:s + m], draws(torch, seed, s, m, self.device), dtype)
        return self._host(out.reshape(f32.shape), dtype)

    def _fp8_nearest(self, f32, dtype: str) -> np.ndarray:
        """Saturate to the format's largest finite value, then torch's round-to-nearest-even cast (as
        lorabox.quant.fp8.round_fp8 does on the CPU; NaN stays NaN)."""
        torch = self.torch
        fmt = torch.float8_e4m3fn if dtype == "F8_E4M3" else torch.float8_e5m2
        big = torch.finfo(fmt).max
        return self._host(f32.clamp(-big, big).to(fmt).view(torch.uint8), dtype)
