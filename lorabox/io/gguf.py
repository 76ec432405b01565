"""GGUF diffusion models as a merge base and as a merge output, with ComfyUI-GGUF's conventions.

ComfyUI-GGUF (city96/ComfyUI-GGUF) stores a diffusion model as: `general.architecture` (flux, sd1, sdxl, sd3,
aura, hidream, cosmos, ltxv, hyvid, wan, lumina2, qwen_image), tensors under their original names minus
`model.diffusion_model.`, and `comfy.gguf.orig_shape.<name>` (ARRAY of INT32, numpy order) for tensors stored
reshaped. GGUF tensor infos hold dims in ggml order (fastest first): numpy shape = reversed(ggml dims); gguf-py's
`GGUFWriter.add_tensor_info` takes the numpy shape and reverses it, `GGUFReader` gives `tensor.shape` in ggml order.

    base = open_gguf("flux1-dev-Q8_0.gguf")
    for t in base.tensors:                       # file order
        w = base.read(t)                         # float32, orig_shape applied
    qtype, stored = choose_qtype(name, shape, "Q4_K_M", "BF16", "flux")
    with GGUFStreamWriter(out, "flux", [(name, qtype, shape, stored), ...], base.kv, base.kv_types) as w:
        w.write(name, encode(values, qtype, stored))  # one tensor at a time, in order

Only `gguf` (the package, imported lazily) and numpy; no torch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputFileError, OutputError
from . import direct
from .files import AtomicWriter, Writeback, pread_exact, temporary_beside

ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."
FLOAT_TYPES = ("F32", "F16", "BF16")
MAX_TENSOR_NAME_LENGTH = 127   # convert.py MAX_TENSOR_NAME_LENGTH (GGML_MAX_NAME 128 in lcpp.patch)
MAX_TENSOR_DIMS = 4            # convert.py MAX_TENSOR_DIMS (GGML_MAX_DIMS)
QUANTIZATION_THRESHOLD = 1024  # convert.py: tensors with <= this many elements stay F32
REARRANGE_THRESHOLD = 512      # convert.py: SD1/SDXL reshape only tensors with >= this many elements
QK_K = 256

# Reader-only pseudo fields of gguf.GGUFReader, and keys the writer regenerates.
_SKIP_KV = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture")


# ------------------------------------------------------------------------------------------------------ reader

@dataclass(frozen=True)
class GGUFTensor:
    name: str
    qtype: str                    # "F32", "F16", "BF16", "Q8_0", "Q4_K", ...
    shape: tuple[int, ...]        # numpy order, comfy.gguf.orig_shape applied
    offset: int                   # absolute offset of the data in the file
    nbytes: int
    stored_shape: tuple[int, ...] = ()  # numpy order as stored (differs from shape when reshaped)


class GGUFBase:
    """A GGUF file opened read-only: `gguf.GGUFReader` parses the header; tensor data is read with `pread`, not
    through the reader's memory map, so a merge's resident memory stays at a few tensors (mapped pages that were
    read would count toward RSS until the kernel reclaims them)."""

    def __init__(self, path: Path, reader: Any):
        self.path = path
        self._reader = reader
        self._fd: int | None = os.open(path, os.O_RDONLY)
        self.architecture: str | None = None
        self.kv: dict[str, Any] = {}
        self.kv_types: dict[str, tuple[str, str | None]] = {}  # key -> (GGUFValueType name, array sub-type name)
        self.tensors: list[GGUFTensor] = []
        self.alignment = int(reader.alignment)

    def __getitem__(self, name: str) -> GGUFTensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def read_raw(self, t: GGUFTensor) -> np.ndarray:
        """The tensor's bytes as stored (a read-only uint8 array)."""
        buf = pread_exact(self._fd, t.nbytes, t.offset, path=self.path, what=f"tensor {t.name!r}")
        return np.frombuffer(buf, np.uint8)

    def read(self, t: GGUFTensor) -> np.ndarray:
        """The tensor's values as float32, in its original (orig_shape) shape."""
        return decode(self.read_raw(t), t.qtype, t.stored_shape or t.shape).reshape(t.shape)

    def close(self) -> None:
        self._reader = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def open_gguf(path: str | os.PathLike) -> GGUFBase:
    """Open a GGUF file; bad files raise `InputFileError` with one line that says what is wrong."""
    import gguf

    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path}: no such file.", hint="Check the path.")
    if path.is_dir():
        raise InputFileError(f"{path}: is a directory, not a file.", hint="Give the .gguf file inside it.")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if len(magic) < 4:
        raise InputFileError(f"{path}: is {size} bytes, too short to be a GGUF file.", hint="Download it again.")
    if magic != b"GGUF":
        raise InputFileError(f"{path}: not a GGUF file (it does not start with 'GGUF').")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:  # gguf-py raises ValueError/IndexError/... on a cut or corrupt header
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputFileError(f"{path}: truncated or corrupt GGUF file ({size} bytes; gguf-py: {msg})",
                             hint="Download it again.") from None

    base = GGUFBase(path, reader)
    orig: dict[str, tuple[int, ...]] = {}
    for key, field in reader.fields.items():
        if key in _SKIP_KV:
            continue
        if key.startswith(ORIG_SHAPE_PREFIX):
            try:
                orig[key[len(ORIG_SHAPE_PREFIX):]] = tuple(int(v) for v in field.contents())
            except (TypeError, ValueError):
                raise InputFileError(f"{path}: bad metadata {key!r} (expected an array of integers).") from None
            continue
        base.kv[key] = field.contents()
        vtype = field.types[0].name if field.types else None
        sub = field.types[-1].name if field.types and field.types[0] == gguf.GGUFValueType.ARRAY else None
        base.kv_types[key] = (vtype, sub)
    arch = reader.get_field("general.architecture")
    if arch is not None:
        if arch.types != [gguf.GGUFValueType.STRING]:
            raise InputFileError(f"{path}: general.architecture is not a string.")
        base.architecture = arch.contents()
    for rt in reader.tensors:
        qtype = rt.tensor_type.name
        stored = tuple(int(d) for d in reversed(rt.shape.tolist()))
        nbytes = int(rt.n_bytes)
        offset = int(rt.data_offset)
        if offset + nbytes > size:
            raise InputFileError(f"{path}: tensor {rt.name!r} needs bytes up to {offset + nbytes} but the file has "
                                 f"{size}: truncated.", hint="Download it again.")
        shape = orig.pop(rt.name, stored)
        if int(np.prod(shape, dtype=np.int64)) != int(rt.n_elements):
            raise InputFileError(f"{path}: {ORIG_SHAPE_PREFIX}{rt.name} = {list(shape)} does not hold the "
                                 f"{int(rt.n_elements)} values stored.")
        base.tensors.append(GGUFTensor(rt.name, qtype, shape, offset, nbytes, stored))
    if orig:
        raise InputFileError(f"{path}: {ORIG_SHAPE_PREFIX}{next(iter(orig))} names no tensor of the file.")
    return base


# ---------------------------------------------------------------------------------------------- value coding

def decode(raw: np.ndarray, qtype: str, stored_shape, pool=None) -> np.ndarray:
    """Bytes of one tensor -> float32 array of `stored_shape` (`pool`: an executor for the block decoders)."""
    shape = tuple(int(n) for n in stored_shape)
    raw = np.asarray(raw).reshape(-1).view(np.uint8)
    if qtype == "F32":
        return raw.view(np.float32).reshape(shape).copy()
    if qtype == "F16":
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    if qtype == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    from ..quant import gguf_quants as gq
    if qtype in gq.QTYPES:
        return gq.dequantize(raw, qtype, shape, pool=pool)
    import gguf  # any other type gguf-py decodes (Q2_K, Q3_K, IQ*...): slower, numpy only
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).astype(np.float32).reshape(shape)


def encode(values: np.ndarray, qtype: str, stored_shape=None, pool=None) -> np.ndarray:
    """Float values -> the bytes `GGUFStreamWriter.write` takes for `qtype` (reshaped to `stored_shape` first;
    `pool`: an executor for the block quantizers)."""
    x = np.asarray(values)
    if stored_shape is not None:
        x = x.reshape(tuple(stored_shape))
    if qtype == "F32":
        return np.ascontiguousarray(x, dtype=np.float32)
    if qtype == "F16":
        return np.ascontiguousarray(x, dtype=np.float16)
    if qtype == "BF16":
        from ..tensor import Tensor
        return Tensor.from_values(x, "BF16").array
    from ..quant import gguf_quants as gq
    return gq.quantize(x, qtype, pool=pool)


def tensor_nbytes(qtype: str, shape) -> int:
    import gguf
    bs, ts = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    n = int(np.prod(tuple(shape), dtype=np.int64))
    if tuple(shape) and int(tuple(shape)[-1]) % bs:
        raise ValueError(f"a {qtype} tensor needs rows that are a multiple of {bs}, got shape {list(shape)}")
    return n // bs * ts


# ------------------------------------------------------------------------------------------------------ writer

def _infer_kv_type(value: Any) -> tuple[str, str | None]:
    if isinstance(value, (bool, np.bool_)):
        return "BOOL", None
    if isinstance(value, (int, np.integer)):
        return ("UINT32", None) if 0 <= int(value) < 2**32 else ("INT64", None)
    if isinstance(value, (float, np.floating)):
        return "FLOAT32", None
    if isinstance(value, (str, bytes)):
        return "STRING", None
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("empty arrays cannot be stored in GGUF metadata")
        first = value[0]
        if isinstance(first, (bool, np.bool_)):
            return "ARRAY", "BOOL"
        if isinstance(first, (int, np.integer)):
            return "ARRAY", "INT32" if all(-2**31 <= int(v) < 2**31 for v in value) else "INT64"
        if isinstance(first, (float, np.floating)):
            return "ARRAY", "FLOAT32"
        return "ARRAY", "STRING"
    raise ValueError(f"cannot store a {type(value).__name__} in GGUF metadata")


class GGUFStreamWriter(AtomicWriter):
    """Write a GGUF file tensor by tensor: header, metadata and tensor infos first (from names, types and shapes
    known in advance), then each tensor's data in order, so memory does not grow with the file. Atomic: a
    temporary file in the target folder, renamed on `close()`; any exception (an interrupt, a full disk) in the
    `with` block removes it.

    tensors: (name, qtype, shape[, stored_shape]) in file order; shapes in numpy order. When `stored_shape`
        differs from `shape` the data is stored as `stored_shape` and `comfy.gguf.orig_shape.<name>` = shape
        (ARRAY of INT32, as ComfyUI-GGUF's convert.py writes and loader.py requires).
    kv: metadata; `general.architecture` and `comfy.gguf.orig_shape.*` entries are ignored (regenerated).
    kv_types: key -> (GGUFValueType name, array sub-type name or None), e.g. `GGUFBase.kv_types`, to keep the
        types of a base file's metadata; otherwise inferred (int -> UINT32/INT64, float -> FLOAT32, int list ->
        INT32 array).
    """

    what = "gguf stream writer"

    def __init__(self, path: str | os.PathLike, architecture: str,
                 tensors: list[tuple], kv: dict[str, Any] | None = None,
                 kv_types: dict[str, tuple[str, str | None]] | None = None):
        import gguf

        self.path = Path(path)
        if not self.path.parent.exists():
            raise OutputError(f"{self.path.parent}: no such directory.")
        self._expect: list[tuple[str, str, tuple[int, ...], int]] = []
        w = gguf.GGUFWriter(path=None, arch=architecture)
        kv = dict(kv or {})
        kv_types = dict(kv_types or {})
        for key, value in kv.items():
            if key in _SKIP_KV or key.startswith(ORIG_SHAPE_PREFIX):
                continue
            if key == "general.alignment":
                w.add_custom_alignment(int(value))
                continue
            vtype, sub = kv_types.get(key) or _infer_kv_type(value)
            if vtype == "ARRAY" and not isinstance(value, (list, tuple)):
                value = [value]
            w.add_key_value(key, list(value) if vtype == "ARRAY" else value, gguf.GGUFValueType[vtype],
                            sub_type=gguf.GGUFValueType[sub] if sub else None)
        seen = set()
        for entry in tensors:
            name, qtype, shape = entry[0], str(entry[1]).upper(), tuple(int(n) for n in entry[2])
            stored = tuple(int(n) for n in entry[3]) if len(entry) > 3 and entry[3] is not None else shape
            if name in seen:
                raise ValueError(f"duplicate tensor name {name!r}")
            seen.add(name)
            if len(name.encode()) > MAX_TENSOR_NAME_LENGTH:
                raise OutputError(f"tensor name {name!r} is longer than {MAX_TENSOR_NAME_LENGTH} bytes, "
                                  f"which GGUF loaders refuse.")
            if len(stored) > MAX_TENSOR_DIMS or not stored:
                raise OutputError(f"tensor {name!r}: GGUF stores 1 to {MAX_TENSOR_DIMS} dimensions, "
                                  f"got {list(stored)}.")
            if int(np.prod(stored, dtype=np.int64)) != int(np.prod(shape, dtype=np.int64)):
                raise ValueError(f"tensor {name!r}: stored shape {list(stored)} does not hold shape {list(shape)}")
            nbytes = tensor_nbytes(qtype, stored)
            if stored != shape:
                w.add_key_value(f"{ORIG_SHAPE_PREFIX}{name}", list(shape), gguf.GGUFValueType.ARRAY,
                                sub_type=gguf.GGUFValueType.INT32)
            w.add_tensor_info(name, stored, np.dtype(np.float32), nbytes, raw_dtype=gguf.GGMLQuantizationType[qtype])
            self._expect.append((name, qtype, stored, nbytes))
        self._writer = w
        self._next = 0
        self._tmp = temporary_beside(self.path)
        try:
            w.write_header_to_file(path=Path(self._tmp))
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            w.fout[0].flush()
            self._header_end = w.fout[0].tell()  # metadata and tensor infos: where `fill` finds its placeholders
        except BaseException:
            self.abort()
            raise
        self._fills: list[tuple[bytes, bytes]] = []
        self._writeback = Writeback(w.fout[0])
        self._align = w.data_alignment
        self._direct = None
        size = _pad(self._header_end, self._align) + sum(_pad(e[3], self._align) for e in self._expect)
        if direct.wanted(size):
            try:
                with open(self._tmp, "rb") as f:  # read before `open_direct`, whose probe writes the first block
                    head = f.read(self._header_end)
                self._direct = direct.open_direct(self._tmp)
                if self._direct is not None:  # the header again, through the direct writer, then its padding
                    self._direct.write(head)
                    self._direct.write(bytes(_pad(self._header_end, self._align) - self._header_end))
            except BaseException:
                self.abort()
                raise

    def write(self, name: str, data: np.ndarray) -> None:
        """Append the next tensor: uint8 block data for quantized types; float32 for F32; float16 (or uint16
        bits) for F16; uint16 bits for BF16; or, for any type, the raw uint8 bytes (`GGUFBase.read_raw`, copied
        through). Any shape with the right byte count."""
        if self._next >= len(self._expect):
            raise ValueError(f"gguf stream writer: all {len(self._expect)} tensors are written, got {name}")
        want, qtype, stored, nbytes = self._expect[self._next]
        data = np.ascontiguousarray(data)
        ok_dtype = {"F32": (np.float32, np.uint32), "F16": (np.float16, np.uint16), "BF16": (np.uint16,)}.get(
            qtype, ()) + (np.uint8,)
        if name != want or data.dtype not in [np.dtype(d) for d in ok_dtype] or data.nbytes != nbytes:
            raise ValueError(f"gguf stream writer: expected {want} {qtype} {list(stored)} ({nbytes} bytes), got "
                             f"{name} {data.dtype} {list(data.shape)} ({data.nbytes} bytes)")
        if self._direct is not None:
            self._direct.write(data.reshape(-1).view(np.uint8))
            self._direct.write(bytes(_pad(nbytes, self._align) - nbytes))  # as gguf-py pads each tensor
        else:
            self._writer.write_tensor_data(data.reshape(-1))
            self._writeback()
        self._next += 1

    def fill(self, placeholder: str, value: str) -> None:
        """Replace a metadata placeholder with a value of the same length (written in place on close)."""
        old, new = placeholder.encode(), value.encode()
        if len(old) != len(new):
            raise ValueError("placeholder and value must have the same length")
        self._fills.append((old, new))

    def _finish(self) -> None:
        fout = self._writer.fout[0]
        if self._direct is not None:
            self._direct.finish()
        fout.flush()
        if self._fills:
            with open(self._tmp, "rb") as f:  # the writer's own file is write-only
                head = bytearray(f.read(self._header_end))
            for old, new in self._fills:
                at = head.index(old)
                head[at:at + len(new)] = new
                os.pwrite(fout.fileno(), new, at)
        os.fsync(fout.fileno())
        self._writer.close()

    def _release(self) -> None:
        if getattr(self, "_direct", None) is not None:
            self._direct.close()
        if hasattr(self, "_writer"):
            self._writer.close()


def _pad(n: int, align: int) -> int:
    return -(-n // align) * align


# -------------------------------------------------------------------------------------------- type selection

# convert.py ModelTemplate.keys_hiprec: kept F32 (from F32/BF16 sources).
KEYS_HIPREC = {
    "hidream": (".ff_i.gate.weight", "img_emb.emb_pos"),
    "cosmos": ("pos_embedder",),
    "wan": (".modulation",),
    "ltxv": ("scale_shift_table",),
}
# convert.py ModelSD1/ModelSDXL.shape_fix
SHAPE_FIX = ("sd1", "sdxl")
# lcpp.patch llama_model_quantize_internal, "rules for image models": substrings (find) and exact names (==)
# that llama-quantize leaves unquantized.
KEEP_SUBSTR = {
    "flux": ("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer."),
    "sd1": ("class_embedding.", "time_embedding.", "add_embedding.", "time_embed.", "label_emb.", "conv_in.",
            "conv_out."),
    "sd3": ("final_layer.", "time_text_embed.", "context_embedder.", "t_embedder.", "y_embedder.", "x_embedder."),
    "aura": ("t_embedder.", "init_x_linear."),
    "ltxv": ("adaln_single.", "caption_projection.", "patchify_proj.", "proj_out.", "scale_shift_table"),
    "hyvid": ("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer."),
    "wan": ("modulation.", "patch_embedding.", "text_embedding.", "time_projection.", "time_embedding.",
            "img_emb.", "head."),
    "hidream": ("p_embedder.", "t_embedder.", "x_embedder.", "final_layer.", ".ff_i.gate.weight",
                "caption_projection."),
    "cosmos": ("p_embedder.", "t_embedder.", "t_embedding_norm.", "x_embedder.", "pos_embedder.", "final_layer."),
    "lumina2": ("t_embedder.", "x_embedder.", "final_layer.", "cap_embedder.", "context_refiner.", "noise_refiner."),
}
KEEP_SUBSTR["sdxl"] = KEEP_SUBSTR["sd1"]
KEEP_EXACT = {
    "sd1": ("input_blocks.0.0.weight", "out.2.weight"),
    "sdxl": ("input_blocks.0.0.weight", "out.2.weight"),
    "sd3": ("proj_out.weight", "pos_embed"),
    "aura": ("modF.1.weight", "cond_seq_linear.weight", "final_linear.weight", "positional_encoding",
             "register_tokens"),
}
# lcpp.patch img_tensor_get_type: tensors that mixes give more bits.
_ATTN_V = ("attn_v.weight", ".to_v.weight", ".v.weight", ".attn.w1v.weight", ".attn.w2v.weight",
           "_attn.v_proj.weight")
_ATTN_QKV = ("attn_qkv.weight", "attn.qkv.weight", "attention.qkv.weight")
_FFN_DOWN = ("ffn_down", ".ffn.2.weight", ".ff.net.2.weight", ".mlp.layer2.weight",
             ".adaln_modulation_mlp.2.weight", ".feed_forward.w2.weight")
# llama-quantize file types -> (default tensor type, bumps {rule: type}); "Q4_K"/"Q5_K" are llama-quantize's
# aliases of Q4_K_M/Q5_K_M. Q2_K/Q3_K mixes are not offered: lorabox cannot encode Q2_K/Q3_K.
MIXES = {
    "Q4_K_S": ("Q4_K", {"v4": "Q5_K", "ffn": "Q5_K"}),
    "Q4_K_M": ("Q4_K", {"v": "Q6_K", "qkv": "Q5_K", "ffn": "Q6_K"}),
    "Q5_K_S": ("Q5_K", {}),
    "Q5_K_M": ("Q5_K", {"v": "Q6_K", "qkv": "Q6_K", "ffn": "Q6_K"}),
    "Q6_K": ("Q6_K", {}),
    "Q8_0": ("Q8_0", {}),
    "Q4_0": ("Q4_0", {"ffn": "Q4_1"}),
    "Q4_1": ("Q4_1", {}),
    "Q5_0": ("Q5_0", {"ffn": "Q5_1"}),
    "Q5_1": ("Q5_1", {}),
}
PLAIN = ("Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # ggml types (for pure=True)
MIXES["Q4_K"] = MIXES["Q4_K_M"]
MIXES["Q5_K"] = MIXES["Q5_K_M"]


def _ggml_n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing ggml dims of size 1 (leading numpy dims) do not count."""
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    return max(1, len(dims))


def stored_shape_for(name: str, shape, architecture: str) -> tuple[int, ...]:
    """convert.py's SD1/SDXL shape fix: a tensor with > 1 dim, >= 512 elements, a multiple of 256 elements and a
    last dim that is not a multiple of 256 is stored as (n/256, 256) (whatever its type)."""
    shape = tuple(int(n) for n in shape)
    n = int(np.prod(shape, dtype=np.int64))
    if (architecture in SHAPE_FIX and len(shape) > 1 and n >= REARRANGE_THRESHOLD and n % 256 == 0
            and shape[-1] % 256 != 0):
        return (n // 256, 256)
    return shape


def choose_qtype(name: str, shape, target_qtype: str, source_dtype: str, architecture: str, *,
                 pure: bool = False, attn_v_index: int = 0) -> tuple[str, tuple[int, ...]]:
    """The type and stored shape ComfyUI-GGUF's tools give tensor `name` in a `target_qtype` file.

    Two stages, as in ComfyUI-GGUF: convert.py makes the float file (F16, or BF16 from a bf16 source; F32 for 1-D,
    <= 1024-element and per-architecture high-precision tensors of an F32/BF16 source; SD1/SDXL reshape), then
    the patched llama-quantize quantizes 2-D tensors whose name ends in "weight" and is not a norm or one of the
    architecture's kept tensors, with the mix's bumps (`target_qtype` is a llama-quantize type name: Q4_K_M,
    Q5_K_S, Q8_0...; `pure=True` gives every quantized tensor exactly `target_qtype`), and F16 for rows that are
    not a multiple of the block size. `attn_v_index` counts earlier quantized v-projection tensors (Q4_K_S
    bumps the first 4); `plan_qtypes` keeps that count over a whole model.

    Returns (qtype, stored_shape) with stored_shape in numpy order.
    """
    shape = tuple(int(n) for n in shape)
    arch = (architecture or "").lower()
    target = target_qtype.upper()
    src = (source_dtype or "F16").upper()
    n = int(np.prod(shape, dtype=np.int64))
    # --- convert.py handle_tensors
    float_type = "BF16" if src == "BF16" else "F16"
    high = src in ("F32", "BF16", "F64") and (
        len(shape) <= 1 or n <= QUANTIZATION_THRESHOLD or any(k in name for k in KEYS_HIPREC.get(arch, ())))
    if high:
        float_type = "F32"
    stored = stored_shape_for(name, shape, arch)
    if target in FLOAT_TYPES:
        return ("F32" if float_type == "F32" or target == "F32" else target), stored
    if target not in MIXES:
        raise ValueError(f"unknown GGUF target type {target_qtype!r}; choose from "
                         f"{', '.join(FLOAT_TYPES + tuple(MIXES))}")
    # --- lcpp.patch: does llama-quantize touch this tensor?
    quantize = (name.endswith("weight") and "_norm.weight" not in name and _ggml_n_dims(stored) == 2
                and not any(k in name for k in KEEP_SUBSTR.get(arch, ()))
                and name not in KEEP_EXACT.get(arch, ()))
    if n <= QUANTIZATION_THRESHOLD or (high and len(shape) <= 1):
        quantize = False  # lorabox keeps convert.py's tiny F32 tensors (llama-quantize has none in practice)
    if not quantize:
        return float_type, stored
    default, bumps = MIXES[target]
    qtype = default
    if pure:
        qtype = target if target in PLAIN else default
    elif any(k in name for k in _ATTN_V):
        qtype = bumps.get("v", bumps["v4"] if "v4" in bumps and attn_v_index < 4 else default)
    elif any(k in name for k in _ATTN_QKV):
        qtype = bumps.get("qkv", default)
    elif any(k in name for k in _FFN_DOWN):
        qtype = bumps.get("ffn", default)
    # --- lcpp.patch img_tensor_get_type "sanity check for row shape" (K-quants), and ggml's block rule
    block = QK_K if qtype.endswith("_K") else 32
    if stored[-1] % block:
        return "F16", stored
    return qtype, stored


def plan_qtypes(entries, target_qtype: str, architecture: str, *, pure: bool = False):
    """`choose_qtype` over a whole model in file order: entries (name, shape, source_dtype) -> [(qtype, stored)],
    counting quantized v-projections as llama-quantize does (`qs.i_attention_wv`)."""
    out, wv = [], 0
    for name, shape, src in entries:
        qtype, stored = choose_qtype(name, shape, target_qtype, src, architecture, pure=pure, attn_v_index=wv)
        if qtype not in FLOAT_TYPES and any(k in name for k in _ATTN_V):
            wv += 1
        out.append((qtype, stored))
    return out
