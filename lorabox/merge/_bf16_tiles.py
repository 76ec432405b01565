"""The certified tiles for a bfloat16 LoRA on a bfloat16 or float16 weight kept in its type, in one compiled loop:
products, proof and rounding.

`certified` proves each element of W + ratio*scale*(up@down) from a float32 product. Where `up` and `down` are
bfloat16 the products need no float32 GEMM: x86's AVX512_BF16 multiplies bfloat16 pairs exactly and adds them in
float32 (`vdpbf16ps`: round to nearest even, denormals in and out flushed to zero), 32 products per instruction,
twice what a float32 FMA does. This module writes that loop as LLVM IR, compiled here by llvmlite (numba's own LLVM,
already installed), for the host CPU, one function per weight format (`lorabox_tiles_BF16`, `lorabox_tiles_F16`).
The machine code is kept in lorabox's cache folder (`io.files.cache_dir`), keyed by LLVM's version, the CPU, its
features and the IR: compiling takes 0.7 s of a merge's start, loading 1 ms.

- the products of a 6-row by 64-column block stay in 24 vector registers while the `up` pairs of its rows are
  broadcast against the pair-interleaved `down` (`pack_down`), one pair of ranks per loop step;
- then, still in registers, the epilogue of `certified`'s pass: times ratio*scale, plus W, the bound, both
  roundings, the output bits and one flag bit per element (16 per mask word);
- the flagged elements (the same rare few) are repaired afterwards in float64 by `_certified_numba.repair_bf16`
  (`repair_f16`).

No float32 product tile goes through memory, and W and the output are touched once. Where the CPU lacks
AVX512_BF16 the same loop can widen each bfloat16 to float32 and use FMAs (`dot="fma"`): exact products, one
rounding per addition, the same bound. It is slower than the float32 GEMM, so lorabox does not use it; the tests run
it on every CPU, and the AVX512_BF16 loop wherever the CPU has the instruction.

The bound (`certified.bounds`, gamma(K + 4)) covers the K roundings of the sum, the product by the float32
multiplier and that multiplier's own rounding. The flushes are covered by `tiny(...)`; a denormal factor (which
the instruction would read as zero) sends the weight to the float32 GEMM instead (`usable`).
"""
from __future__ import annotations

import ctypes
import hashlib
from pathlib import Path

import numpy as np

from ..io.files import cache_dir, write_cache
from . import certified

FORMATS = ("BF16", "F16")  # the weight's format (bfloat16 or float16; the factors are bfloat16 either way)
MR, NV = 6, 4  # rows per block, 16-column vectors per block: 24 accumulators of the 32 registers
_engines: list = []  # the JIT engines must outlive their functions
OBJECT_VERSION = 1  # part of the object cache's key: raise it when the cache file's format changes
_ARGS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
         ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float,
         ctypes.c_float, ctypes.c_int64, ctypes.c_int64]


def has_avx512_bf16() -> bool:
    try:
        import llvmlite.binding as llvm
    except ImportError:
        return False
    return bool(llvm.get_host_cpu_features().get("avx512bf16"))


def usable(up_bits: np.ndarray, down_bits: np.ndarray) -> bool:
    """No denormal factor (the instruction reads them as zero): exponent bits zero with a nonzero fraction."""
    for bits in (up_bits, down_bits):
        magnitude = bits & np.uint16(0x7FFF)
        magnitude -= np.uint16(1)  # denormals 1..0x7F -> 0..0x7E; zero wraps round to 0xFFFF
        if np.any(magnitude < 0x7F):
            return False
    return True


def tiny(scale: float, k: int) -> np.float32:
    """The bound's additive term: certified's 2^-120 plus what the instruction flushes to zero (each product and each
    partial sum under 2^-126, 2k of them, times the multiplier), rounded up."""
    return np.float32(np.nextafter(np.float32(2.0 ** -120 + abs(scale) * (2 * k + 2) * 2.0 ** -126),
                                   np.float32(np.inf)))


def pack_up(up_bits: np.ndarray) -> np.ndarray:
    """(rows, K) bfloat16 bits -> (rows, K/2) pairs as uint32, K padded to even with zeros."""
    rows, k = up_bits.shape
    out = np.zeros((rows, k + (k & 1)), np.uint16)
    out[:, :k] = up_bits
    return out.view(np.uint32)


def pack_down(down_bits: np.ndarray) -> np.ndarray:
    """(K, cols) bfloat16 bits -> (K/2, cols) uint32, row q's element in the low half and row q+1's in the high one
    (the instruction's pair order)."""
    k, cols = down_bits.shape
    pairs = np.zeros((k + (k & 1), cols), np.uint16)
    pairs[:k] = down_bits
    return np.ascontiguousarray(np.stack([pairs[0::2], pairs[1::2]], axis=-1)).view(np.uint32).reshape(-1, cols)


def kernel(dot: str = "bf16", fmt: str = "BF16"):
    """The compiled tile function for a `fmt` weight (BF16 or F16, written as the same type): a ctypes function (it
    drops the GIL while it runs)

        fn(U, k_pairs, D, ldd, W, ldw, O, ldo, M, ldm, RB, CB, s, tiny, rows, cols)

    U: the tile's `pack_up` rows, k_pairs long; D: `pack_down`'s array at the tile's first column, ldd its row length; W and O:
    the weight's bits at the tile's origin with their row lengths; M: uint16 flag words (cols/16 per row, row length
    ldm); RB, CB: `certified.bounds` for the tile's rows and columns; s: ratio*scale as float32. `cols` must be a
    multiple of 16. None where llvmlite cannot compile it here."""
    functions = certified._once(("bf16_module", dot), _compile, dot)  # one module holds both formats
    return None if functions is None else functions.get(fmt)


def _compile(dot: str):
    try:
        import llvmlite.binding as llvm

        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        target = llvm.Target.from_default_triple()
        cpu, features = llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()
        tm = target.create_target_machine(cpu=cpu, features=features, opt=3)
        text = ir_text(dot)
        key = hashlib.sha256(repr((OBJECT_VERSION, llvm.llvm_version_info, target.triple, cpu, features, text))
                             .encode()).hexdigest()[:32]
        obj = _cached_object(key)
        if obj is None:
            obj = _object(llvm, tm, text)
            _store_object(key, obj)
        engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), tm)
        engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
        engine.finalize_object()
        addresses = {fmt: engine.get_function_address(f"lorabox_tiles_{fmt}") for fmt in FORMATS}
        if not all(addresses.values()):
            return None
    except Exception:  # noqa: BLE001 -- any failure means: use the float32 GEMM
        return None
    _engines.append(engine)
    return {fmt: ctypes.CFUNCTYPE(None, *_ARGS)(address) for fmt, address in addresses.items()}


def _object(llvm, tm, text: str) -> bytes:
    """The IR optimised and compiled to machine code for the host: 0.7 s, the reason for the object cache."""
    module = llvm.parse_assembly(text)
    module.verify()
    pb = llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(speed_level=3))
    pb.getModulePassManager().run(module, pb)
    return tm.emit_object(module)


def _object_path(key: str) -> Path | None:
    folder = cache_dir()
    return None if folder is None else folder / f"tiles-{key}.o"


def _cached_object(key: str) -> bytes | None:
    """The object code kept for `key` (LLVM's version, the host CPU and its features, the IR), or None. The file
    ends with the sha256 of what precedes it: a torn or altered file is compiled again, never loaded."""
    path = _object_path(key)
    try:
        data = path.read_bytes() if path is not None else b""
    except OSError:
        return None
    obj, digest = data[:-32], data[-32:]
    return obj if len(data) > 32 and hashlib.sha256(obj).digest() == digest else None


def _store_object(key: str, obj: bytes) -> None:
    """Keep `obj`, followed by its sha256, for the next process."""
    path = _object_path(key)
    if path is not None:
        write_cache(path, obj + hashlib.sha256(obj).digest())


class _Ir:
    """A few helpers to write straight-line LLVM IR with fresh names."""

    def __init__(self):
        self.lines: list[str] = []
        self.n = 0

    def __call__(self, expr: str) -> str:
        self.n += 1
        name = f"%t{self.n}"
        self.lines.append(f"  {name} = {expr}")
        return name

    def put(self, line: str) -> None:
        self.lines.append(line)


V16F, V16I, V32B = "<16 x float>", "<16 x i32>", "<32 x bfloat>"


def _splat(ir: _Ir, ty: str, scalar_ty: str, value: str) -> str:
    one = ir(f"insertelement {ty} poison, {scalar_ty} {value}, i64 0")
    return ir(f"shufflevector {ty} {one}, {ty} poison, <16 x i32> zeroinitializer")


def _const16(ty: str, value: str) -> str:
    return f"<{', '.join([f'{ty} {value}'] * 16)}>"


def _widen(ir: _Ir, w16: str, fmt: str) -> str:
    """16-bit float bits (<16 x i16>) -> float32, exact."""
    if fmt == "F16":
        return ir(f"fpext <16 x half> " + ir(f"bitcast <16 x i16> {w16} to <16 x half>") + f" to {V16F}")
    w32 = ir(f"shl {V16I} " + ir(f"zext <16 x i16> {w16} to {V16I}") + ", " + _const16("i32", "16"))
    return ir(f"bitcast {V16I} {w32} to {V16F}")


def _narrow(ir: _Ir, x: str, fmt: str) -> str:
    """float32 -> 16-bit bits as <16 x i32>, round to nearest even: float16 by the CPU's conversion (IEEE), bfloat16
    by torch's integer steps."""
    if fmt == "F16":
        h = ir(f"bitcast <16 x half> " + ir(f"fptrunc {V16F} {x} to <16 x half>") + " to <16 x i16>")
        return ir(f"zext <16 x i16> {h} to {V16I}")
    c16, c1, c7fff = _const16("i32", "16"), _const16("i32", "1"), _const16("i32", "32767")
    xi = ir(f"bitcast {V16F} {x} to {V16I}")
    odd = ir(f"and {V16I} " + ir(f"lshr {V16I} {xi}, {c16}") + f", {c1}")
    y = ir(f"add {V16I} " + ir(f"add {V16I} {xi}, {c7fff}") + f", {odd}")
    return ir(f"lshr {V16I} {y}, {c16}")


def _special(ir: _Ir, x: str) -> str:
    """inf or NaN, lane by lane."""
    xi = ir(f"bitcast {V16F} {x} to {V16I}")
    m = ir(f"and {V16I} {xi}, " + _const16("i32", "2147483647"))
    return ir(f"icmp uge {V16I} {m}, " + _const16("i32", "2139095040"))


def _at(ir: _Ir, ty: str, base: str, offset: str) -> str:
    return ir(f"getelementptr {ty}, ptr {base}, i64 {offset}")


def _block(mr: int, nv: int, dot: str, fmt: str) -> str:
    """block_<fmt>_<mr>_<nv>(U, D, ldd, W, ldw, O, ldo, M, ldm, RB, CB, s, tiny, j): rows 0..mr of the pointers
    given, columns j..j+16*nv."""
    ir = _Ir()
    c16, hi_mask = _const16("i32", "16"), _const16("i32", "-65536")
    names = [[f"%a{r}.{v}" for v in range(nv)] for r in range(mr)]
    ir.put("  br label %k.head\nk.head:\n  %kp = phi i64 [0, %entry], [%kp.next, %k.body]")
    for r in range(mr):
        for v in range(nv):
            ir.put(f"  {names[r][v]} = phi {V16F} [zeroinitializer, %entry], [{names[r][v]}.n, %k.body]")
    ir.put("  %k.ok = icmp slt i64 %kp, %kpairs\n  br i1 %k.ok, label %k.body, label %k.done\nk.body:")
    row = ir("mul i64 %ldd, %kp")
    b = [ir(f"load {V16I}, ptr " + _at(ir, "i32", "%D", ir(f"add i64 {row}, %j{16 * v}")) + ", align 4")
         for v in range(nv)]
    for r in range(mr):
        a = ir("load i32, ptr " + _at(ir, "i32", "%U", ir("add i64 " + ir(f"mul i64 %kpairs, {r}") + ", %kp"))
               + ", align 4")
        av = _splat(ir, V16I, "i32", a)
        for v in range(nv):
            acc = names[r][v]
            if dot == "bf16":
                bb, ab = ir(f"bitcast {V16I} {b[v]} to {V32B}"), ir(f"bitcast {V16I} {av} to {V32B}")
                ir.put(f"  {acc}.n = call {V16F} @llvm.x86.avx512bf16.dpbf16ps.512({V16F} {acc}, {V32B} {bb}, "
                       f"{V32B} {ab})")
                continue
            for half in (0, 1):  # widen each half of the pairs, one FMA each
                op, c = ("and", hi_mask) if half else ("shl", c16)
                ah = ir(f"bitcast {V16I} " + ir(f"{op} {V16I} {av}, {c}") + f" to {V16F}")
                bh = ir(f"bitcast {V16I} " + ir(f"{op} {V16I} {b[v]}, {c}") + f" to {V16F}")
                target = f"{acc}.n" if half else f"{acc}.h"
                ir.put(f"  {target} = call {V16F} @llvm.fma.v16f32({V16F} {ah}, {V16F} {bh}, {V16F} "
                       f"{f'{acc}.h' if half else acc})")
    ir.put("  %kp.next = add i64 %kp, 1\n  br label %k.head\nk.done:")
    acc = names
    s = _splat(ir, V16F, "float", "%s")
    tiny = _splat(ir, V16F, "float", "%tiny")
    eps = _const16("float", "0x3EA0000000000000")  # 2^-21: v's rounding and the bound's own
    for r in range(mr):
        rb = _splat(ir, V16F, "float", ir("load float, ptr " + _at(ir, "float", "%RB", str(r)) + ", align 4"))
        w_row, o_row, m_row = (ir(f"mul i64 %{ld}, {r}") for ld in ("ldw", "ldo", "ldm"))
        for v in range(nv):
            col = f"%j{16 * v}"
            p = ir(f"fmul {V16F} {acc[r][v]}, {s}")
            w16 = ir("load <16 x i16>, ptr " + _at(ir, "i16", "%W", ir(f"add i64 {w_row}, {col}")) + ", align 2")
            val = ir(f"fadd {V16F} {_widen(ir, w16, fmt)}, {p}")
            cb = ir(f"load {V16F}, ptr " + _at(ir, "float", "%CB", col) + ", align 4")
            mag = ir(f"call {V16F} @llvm.fabs.v16f32({V16F} {val})")
            bound = ir(f"fadd {V16F} " + ir(f"fmul {V16F} {rb}, {cb}") + ", " + ir(f"fmul {V16F} {mag}, {eps}"))
            bound = ir(f"fadd {V16F} {bound}, {tiny}")
            lo, hi = ir(f"fsub {V16F} {val}, {bound}"), ir(f"fadd {V16F} {val}, {bound}")
            nlo, nhi = _narrow(ir, lo, fmt), _narrow(ir, hi, fmt)
            special = ir(f"or <16 x i1> {_special(ir, lo)}, {_special(ir, hi)}")
            flags = ir(f"or <16 x i1> " + ir(f"icmp ne {V16I} {nlo}, {nhi}") + f", {special}")
            out = ir(f"trunc {V16I} {nhi} to <16 x i16>")
            ir.put(f"  store <16 x i16> {out}, ptr " + _at(ir, "i16", "%O", ir(f"add i64 {o_row}, {col}")) + ", align 2")
            word = _at(ir, "i16", "%M", ir(f"add i64 {m_row}, " + ir(f"lshr i64 {col}, 4")))
            ir.put(f"  store i16 " + ir(f"bitcast <16 x i1> {flags} to i16") + f", ptr {word}, align 2")
    cols = "\n".join(f"  %j{16 * v} = add i64 %j, {16 * v}" for v in range(nv))
    return (f"define internal void @block_{fmt}_{mr}_{nv}({_ARGLIST}, i64 %j) alwaysinline {{\nentry:\n{cols}\n"
            + "\n".join(ir.lines) + "\n  ret void\n}\n")


_ARGLIST = ("ptr %U, i64 %kpairs, ptr %D, i64 %ldd, ptr %W, i64 %ldw, ptr %O, i64 %ldo, ptr %M, i64 %ldm, ptr %RB, ptr %CB, "
            "float %s, float %tiny")


def _loop(name: str, start: str, pred: str, step: int, limit: str, body: list[str], after: str) -> str:
    """`for (i = start; i + step <= limit; i += step) body` with %<name> the index; falls through to `after`."""
    return (f"  br label %{name}.head\n{name}.head:\n"
            f"  %{name} = phi i64 [{start}, %{pred}], [%{name}.next, %{name}.body]\n"
            f"  %{name}.next = add i64 %{name}, {step}\n"
            f"  %{name}.ok = icmp sle i64 %{name}.next, {limit}\n"
            f"  br i1 %{name}.ok, label %{name}.body, label %{after}\n"
            f"{name}.body:\n" + "\n".join(body) + f"\n  br label %{name}.head\n")


def _panel(mr: int, fmt: str) -> str:
    """panel_<fmt>_<mr>: rows 0..mr, every column block (64 wide, then 16)."""
    def call(nv: int, j: str) -> str:
        return (f"  call void @block_{fmt}_{mr}_{nv}(ptr %U, i64 %kpairs, ptr %D, i64 %ldd, ptr %W, i64 %ldw, ptr %O, i64 %ldo, ptr %M, "
                f"i64 %ldm, ptr %RB, ptr %CB, float %s, float %tiny, i64 {j})")
    return (f"define internal void @panel_{fmt}_{mr}({_ARGLIST}, i64 %cols) {{\nentry:\n"
            + _loop("j", "0", "entry", 16 * NV, "%cols", [call(NV, "%j")], "wide.done")
            + "wide.done:\n"
            + _loop("k", "%j", "wide.done", 16, "%cols", [call(1, "%k")], "done")
            + "done:\n  ret void\n}\n")


def ir_text(dot: str = "bf16") -> str:
    """The module: `lorabox_tiles_<fmt>` for each of FORMATS."""
    def call(mr: int, i: str, fmt: str) -> str:
        lines = [f"  %{i}.ku = mul i64 %{i}, %kpairs", f"  %{i}.u = getelementptr i32, ptr %U, i64 %{i}.ku",
                 f"  %{i}.wo = mul i64 %{i}, %ldw", f"  %{i}.w = getelementptr i16, ptr %W, i64 %{i}.wo",
                 f"  %{i}.oo = mul i64 %{i}, %ldo", f"  %{i}.o = getelementptr i16, ptr %O, i64 %{i}.oo",
                 f"  %{i}.mo = mul i64 %{i}, %ldm", f"  %{i}.m = getelementptr i16, ptr %M, i64 %{i}.mo",
                 f"  %{i}.rb = getelementptr float, ptr %RB, i64 %{i}",
                 f"  call void @panel_{fmt}_{mr}(ptr %{i}.u, i64 %kpairs, ptr %D, i64 %ldd, ptr %{i}.w, i64 %ldw, ptr %{i}.o, i64 %ldo, "
                 f"ptr %{i}.m, i64 %ldm, ptr %{i}.rb, ptr %CB, float %s, float %tiny, i64 %cols)"]
        return "\n".join(lines)

    def main(fmt: str) -> str:
        return (f"define void @lorabox_tiles_{fmt}({_ARGLIST}, i64 %rows, i64 %cols) {{\nentry:\n"
                + _loop("i", "0", "entry", MR, "%rows", [call(MR, "i", fmt)], "six.done")
                + "six.done:\n"
                + _loop("r", "%i", "six.done", 1, "%rows", [call(1, "r", fmt)], "done")
                + "done:\n  ret void\n}\n")

    decls = (f"declare {V16F} @llvm.x86.avx512bf16.dpbf16ps.512({V16F}, {V32B}, {V32B})\n" if dot == "bf16"
             else f"declare {V16F} @llvm.fma.v16f32({V16F}, {V16F}, {V16F})\n")
    decls += f"declare {V16F} @llvm.fabs.v16f32({V16F})\n"
    return decls + "".join("".join(_block(mr, nv, dot, fmt) for mr in (MR, 1) for nv in (NV, 1))
                           + _panel(MR, fmt) + _panel(1, fmt) + main(fmt) for fmt in FORMATS)
