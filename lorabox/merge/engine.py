"""The streaming merge: base tensors are read one at a time (the next one is read while the current one is
computed, the previous one written), LoRA deltas are added in float64 row blocks, and the result is rounded once
(as torch rounds: to float32, then to the output dtype) and appended to a safetensors stream. Memory holds a few
tensors whatever the checkpoint size; the output is atomic and carries a `lorabox.merge` record."""
from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__
from ..conversion import load_lora
from ..errors import InputFileError, LoraboxError, OutputError, UnknownArchitecture
from ..io import digests, direct
from ..io.files import commit
from ..io.safetensors import StreamWriter, release, same_file
from ..parallel import READ_AHEAD, WRITE_BEHIND, Behind, prefetch, timed, timed_items
from ..tensor import Tensor, storage_dtype
from .base import BaseCheckpoint, Shard, TensorInfo, open_base
from .gguf_merge import is_gguf, merge_gguf_base, merge_to_gguf
from .compute import FP8, make_compute
from .plan import Plan, factors, make_plan

DTYPES = {"keep": None, "bf16": "BF16", "fp16": "F16", "fp32": "F32", "fp8_e4m3fn": "F8_E4M3", "fp8_e5m2": "F8_E5M2"}
FLOATS = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
STAGES = ("computing", "waiting for reads", "waiting for writes")  # MergeReport.stages


@dataclass
class MergeReport:
    output: str
    architecture: str
    layout: str
    loras: list[dict]
    device: str = "cpu"
    tensors: int = 0
    merged: int = 0
    dropped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    bytes_written: int = 0
    # where the merging thread's time went, in seconds: "computing", "waiting for reads" (the base's reads, or its
    # hashing on the reading thread, are behind), "waiting for writes" (a full write queue: the disk is behind);
    # computing close to `seconds` means the CPU is the limit
    stages: dict = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    # bytes of a base read around the page cache that were copied from it instead (`direct.Residency`)
    base_from_page_cache: int = 0

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def out_dtype(policy: str, dtype: str, ndim: int = 2) -> str:
    """The output dtype of a base tensor. fp8 policies convert matrices and convolutions only; biases and
    norms (1-D) keep their dtype, as ComfyUI's fp8 checkpoints do."""
    target = DTYPES[policy]
    if target is None or dtype not in FLOATS or (target in FP8 and ndim < 2):
        return dtype
    return target


def _load_for(path, base: BaseCheckpoint | None, arch: str | None):
    """A LoRA read for this merge: as `arch` when the user names one; a LoRA whose keys fit several architectures
    (a CLIP-G-only LoRA: SDXL or SD3) as the base's."""
    if arch is not None:
        return load_lora(path, arch=arch)
    try:
        return load_lora(path)
    except UnknownArchitecture as exc:
        tied = getattr(exc, "candidates", [])
        if not tied:
            raise
        if base is not None:
            from .plan import detect_base

            arch = detect_base(base)[0]
        if arch not in tied:
            raise
        return load_lora(path, arch=arch)


def merge(base_path: str | os.PathLike, loras: list[tuple[str | os.PathLike, float]], output: str | os.PathLike, *,
          dtype: str = "keep", rounding: str = "stochastic", quant: str | None = None,
          block_ratios: list[tuple[str, float]] = (), drop_unknown: bool = False,
          arch: str | None = None, overwrite: bool = False, device: str = "auto", compute=None,
          fp8_layout: str | None = None,
          progress: Callable[[int, int], None] | None = None) -> MergeReport:
    """Merge LoRAs at their ratios into a base checkpoint, streaming, and write `output` atomically.

    Args:
        base_path: a .safetensors checkpoint (single-file SD1.5/SDXL, BFL or ComfyUI-packaged Flux) or a diffusers
            model folder (sharded safetensors with an index).
        loras: (path, ratio) pairs; any dialect lorabox reads.
        output: a file (or a folder, for a folder base); never an input.
        dtype: keep | bf16 | fp16 | fp32 | fp8_e4m3fn | fp8_e5m2 for the floating tensors of the output.
        rounding: for fp8 outputs, how LoRA-patched weights are rounded: stochastic (unbiased, seeded from
            CRC32 of the key name, so the same inputs give the same bytes) or nearest; untouched weights are
            always rounded to nearest.
        quant: write GGUF of this type (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) from a safetensors base,
            with ComfyUI-GGUF's rules for what stays F32/F16/BF16. A GGUF base is written as GGUF keeping its types.
        block_ratios: (fnmatch pattern on canonical module names, ratio) pairs multiplying the LoRA ratios.
        device: auto | cpu | cuda[:N]: where the deltas are computed (the bytes are the same on every device).
        fp8_layout: with an fp8 dtype, write ComfyUI scaled fp8 ("legacy": `scaled_fp8` marker and
            `.scale_weight`; "comfy_quant": `.comfy_quant` and `.weight_scale`), one scale per denoiser matrix.
        compute: a compute object (`lorabox.merge.compute`), overriding `device` (tests run the GPU code on
            torch's CPU device this way).
    Returns:
        A MergeReport.
    Example:
        >>> merge("flux1-dev.safetensors", [("style.safetensors", 0.8)], "flux1-dev-style.safetensors")
    """
    started = time.perf_counter()
    loras = [(p, _ratio(r, f"--lora {p}")) for p, r in loras]
    block_ratios = [(p, _ratio(r, f"--block-ratio {p}")) for p, r in block_ratios]
    gguf_base = is_gguf(Path(base_path))
    base = None if gguf_base else open_base(base_path)
    output = Path(output)
    inputs = [Path(base_path), *[Path(p) for p, _ in loras]]
    _check_output(output, inputs, base, overwrite)
    if gguf_base and (dtype != "keep" or quant):
        raise OutputError(f"{base_path}: a GGUF base is merged keeping its types.", hint="Drop --dtype/--quant.")
    if dtype not in DTYPES:
        raise OutputError(f"unknown --dtype {dtype!r}.", hint=f"Use one of {', '.join(DTYPES)}.")
    if rounding not in ("stochastic", "nearest"):
        raise OutputError(f"unknown --rounding {rounding!r}.", hint="Use stochastic or nearest.")
    if fp8_layout and (gguf_base or quant or base.folder):
        raise OutputError(f"--fp8-layout: ComfyUI scaled fp8 is written as one safetensors file from a "
                          f"safetensors checkpoint, not from {'a folder' if base and base.folder else 'GGUF'}.")
    compute = compute or make_compute(device)
    if dtype != "keep" or gguf_base or quant:  # casts, fp8 and GGUF run on torch's CPU kernels: import it meanwhile
        compute.expect(None)
    read = [(_load_for(p, base, arch), r) for p, r in loras]
    record = {"lorabox": __version__, "dtype": dtype, "rounding": rounding, "fp8_layout": fp8_layout,
              "loras": [{"file": Path(p).name, "sha256": digests.file_sha256(Path(p)), "ratio": r} for p, r in loras],
              "block_ratios": [[p, r] for p, r in block_ratios]}
    report = MergeReport(str(output), "", "", record["loras"], device=compute.name)
    total = Path(base_path).stat().st_size if base is None else base.nbytes
    done = 0

    def tick(n):
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    if gguf_base or quant:  # GGUF: the base's digest is taken while it streams, as for safetensors
        record["base"] = {"file": Path(base_path).name, "sha256": digests.PENDING}
        kwargs = dict(arch=arch, block_ratios=block_ratios, drop_unknown=drop_unknown, record=record,
                      report=report, tick=tick, compute=compute)
        with compute.session():  # BLAS threads vs row-block workers: see NumpyCompute.session
            if gguf_base:
                report.bytes_written = merge_gguf_base(Path(base_path), read, output, **kwargs)
            else:
                report.bytes_written = merge_to_gguf(Path(base_path), read, output, quant, **kwargs)
        report.seconds = time.perf_counter() - started
        return report
    plan = make_plan(base, read, arch=arch, block_ratios=block_ratios, drop_unknown=drop_unknown)
    record.update(architecture=plan.architecture, layout=plan.layout, dropped=len(plan.dropped))
    report.architecture, report.layout, report.dropped = plan.architecture, plan.layout, plan.dropped
    _check_space(base, output, dtype)
    compute.expect([(info, out_dtype(dtype, info.dtype, len(info.shape)), plan.patches.get(info.name, []))
                    for info in base.tensors.values()])  # kept 16-bit weights with plain LoRAs need no torch
    with compute.session():
        if base.folder:
            tmp_dir = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
            try:
                for shard in base.shards:
                    report.bytes_written += _merge_shard(shard, plan, tmp_dir / shard.path.name, dtype, rounding,
                                                         record, report, tick, compute, None)
                for extra in sorted(base.path.iterdir()):
                    if extra.is_file() and not extra.name.endswith(".safetensors"):
                        shutil.copy2(extra, tmp_dir / extra.name)
                if output.exists():
                    shutil.rmtree(output)
                commit(tmp_dir, output)  # with a folder's usual mode (mkdtemp makes it 0700)
            except BaseException:
                shutil.rmtree(tmp_dir, ignore_errors=True)
                raise
        else:
            report.bytes_written = _merge_shard(base.shards[0], plan, output, dtype, rounding, record, report, tick,
                                               compute, fp8_layout)
    report.seconds = time.perf_counter() - started
    return report


@dataclass
class ScaledPlan:
    """A shard's ComfyUI scaled-fp8 layers (W = q * scale) and what the merge does with them: `keep` merges
    and re-quantizes with a recomputed scale (written right after its weight), `dequantize` writes W in the
    output dtype and drops the scales and markers."""

    mode: str | None  # None (no scaled layers), "keep", "dequantize", or "make" (scaled fp8 from a plain base)
    layers: dict = field(default_factory=dict)  # weight key -> ScaledLayer ("make": weight key -> layer name)
    scales: dict = field(default_factory=dict)  # scale key -> Tensor (read before streaming: they are tiny)
    skip: set = field(default_factory=set)  # keys not written where they stand in the file
    layout: str | None = None  # "make": legacy or comfy_quant
    marker: str | None = None  # "make", legacy: the `scaled_fp8` marker key, written last


DENOISER = "model.diffusion_model."


def _scaled_plan(shard: Shard, dtype: str, fp8_layout: str | None = None) -> ScaledPlan:
    from ..quant.fp8 import detect_scaled_fp8

    info = detect_scaled_fp8({t.name: (t.dtype, list(t.shape)) for t in shard.tensors}, shard.metadata)
    if fp8_layout:
        if info.layout:
            raise OutputError(f"{shard.path}: is already scaled fp8 ({info.layout} layout).",
                              hint="Merge it keeping its type (--dtype keep), without --fp8-layout.")
        return _make_scaled_plan(shard, dtype, fp8_layout)
    if not info.layout:
        return ScaledPlan(None)
    if info.layout == "mixed" or DTYPES[dtype] in FP8:
        raise OutputError(f"{shard.path}: a ComfyUI scaled-fp8 checkpoint ({info.layout} layout) can be merged "
                          f"keeping its type (--dtype keep) or dequantized (--dtype bf16/fp16/fp32), not to {dtype}.")
    layers = {f"{layer.name}.weight": layer for layer in info.layers.values()
              if layer.scale_key and layer.weight_dtype in FP8}
    by_name = {t.name: t for t in shard.tensors}
    plan = ScaledPlan("keep" if dtype == "keep" else "dequantize", layers)
    with open(shard.path, "rb") as f:
        for layer in layers.values():
            t = by_name[layer.scale_key]
            f.seek(t.offset)
            arr = np.frombuffer(f.read(t.nbytes), dtype=storage_dtype(t.dtype)).reshape(t.shape)
            plan.scales[layer.scale_key] = Tensor(arr, t.dtype)
    plan.skip = {layer.scale_key for layer in layers.values()}
    if plan.mode == "dequantize":
        plan.skip |= set(info.aux_keys) | set(info.markers)
    return plan


def _make_scaled_plan(shard: Shard, dtype: str, layout: str) -> ScaledPlan:
    """ComfyUI scaled fp8 from a plain base: every matrix of the denoiser (`model.diffusion_model.*` in a full
    checkpoint, every matrix in a bare one) becomes fp8 with a per-tensor scale; the rest keeps its dtype,
    as in ComfyUI's own scaled checkpoints (text encoders and VAE would not understand the scales)."""
    fp8 = DTYPES.get(dtype)
    if fp8 not in FP8:
        raise OutputError(f"--fp8-layout {layout} needs --dtype fp8_e4m3fn or fp8_e5m2, not {dtype}.")
    if layout not in ("legacy", "comfy_quant"):
        raise OutputError(f"unknown --fp8-layout {layout!r}.", hint="Use legacy or comfy_quant.")
    full = any(t.name.startswith(DENOISER) for t in shard.tensors)
    layers = {t.name: t.name[: -len(".weight")] for t in shard.tensors
              if t.name.endswith(".weight") and len(t.shape) == 2 and t.dtype in FLOATS and t.dtype not in FP8
              and (not full or t.name.startswith(DENOISER))}
    marker = (DENOISER if full else "") + "scaled_fp8" if layout == "legacy" else None
    return ScaledPlan("make", layers, layout=layout, marker=marker)


def _made_layer(name: str, bits: np.ndarray, fp8: str, scale, layout: str) -> list[tuple[str, Tensor]]:
    from ..quant.fp8 import scaled_layer_tensors

    return list(scaled_layer_tensors(name, bits, fp8, scale, layout=layout).items())


def _entries(shard: Shard, dtype: str, scaled: ScaledPlan) -> list[tuple[str, str, tuple[int, ...]]]:
    """The output tensors in write order: file order, minus skipped keys, each kept scale after its weight."""
    by_name = {t.name: t for t in shard.tensors}
    out = []
    for t in shard.tensors:
        if t.name in scaled.skip:
            continue
        layer = scaled.layers.get(t.name)
        if scaled.mode == "make":
            if layer is None:
                out.append((t.name, t.dtype, t.shape))
            else:
                fp8 = DTYPES[dtype]
                dummy = _made_layer(layer, np.zeros(t.shape, np.uint8), fp8, 1.0, scaled.layout)
                out.extend((name, x.dtype, x.shape) for name, x in dummy)
            continue
        out.append((t.name, out_dtype(dtype, t.dtype, len(t.shape)), t.shape))
        if layer is not None and scaled.mode == "keep":
            s = by_name[layer.scale_key]
            out.append((s.name, s.dtype, s.shape))
    if scaled.marker:
        out.append((scaled.marker, DTYPES[dtype], (0,)))
    return out


def _ratio(value, what: str) -> float:
    """A ratio as a float; NaN or infinity (which `float()` reads from "nan" or "inf") would write NaN weights."""
    try:
        r = float(value)
    except (TypeError, ValueError):
        r = math.nan
    if not math.isfinite(r):
        raise LoraboxError(f"{what}: the ratio {value!r} is not a finite number.", hint="Give a number such as 0.8.")
    return r


def _check_output(output: Path, inputs: list[Path], base: BaseCheckpoint, overwrite: bool) -> None:
    for src in inputs:
        if same_file(output, src) or (src.is_dir() and output.resolve().is_relative_to(src.resolve())):
            raise OutputError(f"{output}: is (inside) an input; lorabox never overwrites its inputs.",
                              hint="Choose another output path with -o.")
    if base is not None and base.folder and output.exists() and not output.is_dir():
        raise OutputError(f"{output}: the base is a folder, so the output must be a folder too.")
    if (base is None or not base.folder) and output.is_dir():
        raise OutputError(f"{output}: is a directory.", hint="Give a file name.")
    if output.exists() and not overwrite:
        raise OutputError(f"{output}: already exists.", hint="Pass --overwrite or choose another path with -o.")
    if not output.parent.exists():
        raise OutputError(f"{output.parent}: no such directory.")


def _check_space(base: BaseCheckpoint, output: Path, dtype: str) -> None:
    need = 0
    for info in base.tensors.values():
        width = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}.get(
            out_dtype(dtype, info.dtype, len(info.shape)))
        need += info.nbytes if width is None else info.nbytes // max(1, _width(info.dtype)) * width
    free = shutil.disk_usage(output.parent).free
    if need > free:
        raise OutputError(f"{output.parent}: needs {need / 1e9:.1f} GB for the output, {free / 1e9:.1f} GB free.",
                          hint="Free some space or write elsewhere.")


def _width(dtype: str) -> int:

    return storage_dtype(dtype).itemsize


def _merge_shard(shard: Shard, plan: Plan, path: Path, dtype: str, rounding: str, record: dict, report: MergeReport,
                 tick, compute, fp8_layout: str | None) -> int:
    scaled = _scaled_plan(shard, dtype, fp8_layout)
    entries = _entries(shard, dtype, scaled)
    rec = dict(record, base={"file": shard.path.name, "sha256": digests.PENDING})
    metadata = dict(shard.metadata)
    if scaled.mode == "dequantize":
        metadata.pop("_quantization_metadata", None)
    metadata["lorabox.merge"] = json.dumps(rec, sort_keys=True)
    fd = os.open(shard.path, os.O_RDONLY)
    reader = None
    try:
        digest = digests.WhileReading(shard.path, fd)  # a base merged before: remembered (io/digests.py)
        reader = direct.open_reader(shard.path, digest.before.st_size)
        with StreamWriter(path, entries, metadata) as writer:
            _stream(shard, fd, digest.hasher, reader, plan, dtype, rounding, scaled, writer, report, tick, compute)
            writer.fill(digests.PENDING, digest.finish())
            size = writer.size
    finally:
        if reader is not None:
            reader.close()
            report.base_from_page_cache += reader.from_cache
        os.close(fd)
    return size


def _read_in_order(shard: Shard, fd: int, hasher, reader: direct.DirectReader | None = None):
    """A generator of (info, Tensor) in file order that also hashes every byte of the file (unless `hasher` is
    None: a digest already known). With a `reader` the bytes are read around the page cache (`_read_direct`).

    Otherwise each tensor is a read-only memory map of its own byte range: the kernel maps page-cache pages
    instead of copying them into fresh, zero-filled buffers (that copy and those page faults doubled the system
    time of a 24 GB merge). The map is released when the last array over it is gone (once written), so resident
    memory stays at the tensors in flight."""

    size, pos = os.fstat(fd).st_size, 0
    _check_size(shard, size)
    if reader is not None:
        yield from _read_direct(shard, size, hasher, reader)
        return
    for info in shard.tensors:
        end = info.offset + info.nbytes
        start = pos - pos % mmap.ALLOCATIONGRANULARITY
        view = memoryview(mmap.mmap(fd, end - start, prot=mmap.PROT_READ, offset=start)) if end > start else b""
        if hasher is not None:
            hasher.update(view[pos - start:])
        else:
            _touch(view)
        arr = np.frombuffer(view, dtype=storage_dtype(info.dtype), count=int(np.prod(info.shape)),
                            offset=info.offset - start).reshape(info.shape)
        pos = end
        yield info, Tensor(arr, info.dtype)
    if size > pos and hasher is not None:
        hasher.update(os.pread(fd, size - pos, pos))


def _check_size(shard: Shard, size: int) -> None:
    short = next((info for info in shard.tensors if info.offset + info.nbytes > size), None)
    if short is not None:  # the file changed since its header was read
        raise InputFileError(f"{shard.path}: ends inside tensor {short.name!r}: truncated.", hint="Download it again.")


def _read_direct(shard: Shard, size: int, hasher, reader: direct.DirectReader):
    """`_read_in_order` with O_DIRECT reads (`direct.read_runs`), each read hashed whole (header, gaps and tail
    included) and each tensor a view of its read's buffer."""
    items = [(info, info.offset, info.nbytes) for info in shard.tensors]
    for info, raw in direct.read_runs(reader, items, size, shard.path, hasher):
        yield info, Tensor(raw.view(storage_dtype(info.dtype)).reshape(info.shape), info.dtype)


def _touch(view) -> None:
    """Read one byte of every page of a mapped tensor, on the read-ahead thread. Without the hash doing it (a digest
    remembered), the compute threads met the disk in page faults and waited there: FLUX.1 merges again took
    52.6-75.1 s, 48.7-49.2 s with this (2 cores, alternating runs)."""
    if len(view):
        np.frombuffer(view, np.uint8)[::mmap.PAGESIZE].max()


def _stream(shard: Shard, fd: int, hasher, reader, plan: Plan, dtype: str, rounding: str, scaled: ScaledPlan,
            writer: StreamWriter, report: MergeReport, tick, compute):
    """Read ahead, compute, write behind, each on its own thread, with bounded bytes in flight: tensor sizes vary
    by 1000x, so one-tensor hand-offs left the compute waiting on the disk and the disk on the compute."""
    ahead = READ_AHEAD if reader is None else READ_AHEAD - direct.AHEAD  # the reads in flight count too
    reads = prefetch(_read_in_order(shard, fd, hasher, reader), ahead, lambda item: item[0].nbytes)
    # closing: on an error the read-ahead thread stops here, before the caller closes the files it reads
    with contextlib.closing(reads), Behind(lambda job: _write(writer, *job, tick), WRITE_BEHIND) as behind:
        for info, t in timed_items(reads, report.stages, "waiting for reads"):
            if info.name in scaled.skip:
                tick(info.nbytes)
                continue
            patches = plan.patches.get(info.name, [])
            target = out_dtype(dtype, info.dtype, len(info.shape))
            layer = scaled.layers.get(info.name)
            with timed(report.stages, "computing"):
                if scaled.mode == "make":
                    outs = _make_scaled(info, t, patches, layer, DTYPES[dtype], scaled.layout, rounding, compute)
                elif layer is not None:
                    outs = _process_scaled(info, t, patches, layer, scaled, target, rounding, compute)
                else:
                    outs = [(info.name, compute.process(info, t, patches, target, rounding))]
            report.tensors += 1
            report.merged += bool(patches)
            release(factors(patches))  # merged: a LoRA's pages go
            with timed(report.stages, "waiting for writes"):
                behind.put((outs, info.nbytes), sum(out.array.nbytes for _, out in outs))
    if scaled.marker:
        from ..quant.fp8 import scaled_fp8_marker

        writer.write(scaled.marker, scaled_fp8_marker(DTYPES[dtype]))


def _make_scaled(info: TensorInfo, t: Tensor, patches: list, layer: str | None, fp8: str, layout: str,
                 rounding: str, compute) -> list[tuple[str, Tensor]]:
    """A plain weight merged, then quantized to scaled fp8 with scale = amax/max; other tensors as they are."""
    if layer is None:
        return [(info.name, compute.process(info, t, patches, t.dtype, rounding))]
    bits, scale = compute.scaled_fp8(info, t, patches, fp8, stochastic=bool(patches) and rounding == "stochastic")
    return _made_layer(layer, bits.reshape(t.shape), fp8, np.asarray(scale).reshape(()), layout)


def _process_scaled(info: TensorInfo, q: Tensor, patches: list, layer, scaled: ScaledPlan, target: str,
                    rounding: str, compute) -> list[tuple[str, Tensor]]:
    """W = q * scale (exact in float64), patched; then re-quantized with a recomputed scale, or written as W."""
    old = scaled.scales[layer.scale_key]
    if not patches and scaled.mode == "keep":
        return [(info.name, q), (layer.scale_key, old)]
    w = Tensor(q.values() * float(old.values().reshape(-1)[0]), "F64")
    if scaled.mode == "dequantize":
        merged = compute.process(info, w, patches, "F32") if patches else Tensor(w.array.astype(np.float32), "F32")
        return [(info.name, Tensor.from_values(merged.array, target) if target != "F32" else merged)]
    bits, scale = compute.scaled_fp8(info, w, patches, q.dtype, stochastic=rounding == "stochastic")
    new_scale = Tensor.from_values(np.full(old.shape, float(np.asarray(scale).reshape(-1)[0])), old.dtype)
    return [(info.name, Tensor(bits.reshape(q.shape), q.dtype)), (layer.scale_key, new_scale)]


def _write(writer: StreamWriter, outs: list[tuple[str, Tensor]], nbytes: int, tick) -> None:
    for name, out in outs:
        writer.write(name, out)
    tick(nbytes)
