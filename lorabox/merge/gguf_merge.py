"""GGUF on either side of a merge. A GGUF base keeps its types: patched tensors are dequantized, merged in
float64, rounded to float32 and quantized again to their own type; untouched tensors are copied byte for byte.
`--quant QTYPE` writes a safetensors base as GGUF with ComfyUI-GGUF's conventions (names without
`model.diffusion_model.`, which tensors stay F32/F16/BF16, reshapes with `comfy.gguf.orig_shape`)."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..errors import OutputError, UnknownArchitecture
from ..io.files import pread_exact
from ..io import digests, direct
from ..io.gguf import GGUFStreamWriter, open_gguf, plan_qtypes
from ..io.safetensors import release
from ..parallel import READ_AHEAD, WRITE_BEHIND, Behind, BufferPool, prefetch, timed, timed_items
from ..tensor import Tensor, storage_dtype
from .base import open_base
from .plan import factors, make_plan

GGUF_ARCH = {"flux1": "flux", "sdxl": "sdxl", "sd15": "sd1"}
LORABOX_ARCH = {v: k for k, v in GGUF_ARCH.items()}
QUANTS = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except (IsADirectoryError, FileNotFoundError):
        return False


def merge_gguf_base(base_path: Path, loras, output: Path, *, arch, block_ratios, drop_unknown, record, report, tick,
                    compute) -> int:
    g = open_gguf(base_path)
    try:
        name = arch or LORABOX_ARCH.get(g.architecture or "")
        if name is None:
            raise UnknownArchitecture(f"{base_path}: GGUF architecture {g.architecture!r} has no key map.",
                                      hint=f"lorabox merges into {', '.join(sorted(LORABOX_ARCH))} GGUF files.")
        view = SimpleNamespace(path=base_path, tensors={t.name: t for t in g.tensors})
        plan = make_plan(view, loras, arch=name, block_ratios=block_ratios, drop_unknown=drop_unknown)
        report.architecture, report.layout, report.dropped = plan.architecture, "gguf", plan.dropped
        _check_requantizable(base_path, [t for t in g.tensors if plan.patches.get(t.name)])
        kv = dict(g.kv, **{"lorabox.merge": json.dumps(record, sort_keys=True)})
        entries = [(t.name, t.qtype, t.shape, t.stored_shape) for t in g.tensors]
        fd = os.open(base_path, os.O_RDONLY)
        try:
            with GGUFStreamWriter(output, g.architecture, entries, kv, g.kv_types) as w:
                def step(t, raw):
                    patches = plan.patches.get(t.name)
                    return compute.requantize(t, raw, patches) if patches else raw  # untouched: byte for byte

                _stream(base_path, fd, [(t, t.offset, t.nbytes) for t in g.tensors], step, w, plan, report, tick)
        finally:
            os.close(fd)
    finally:
        g.close()
    return output.stat().st_size


def merge_to_gguf(base_path: Path, loras, output: Path, qtype: str, *, arch, block_ratios, drop_unknown, record,
                  report, tick, compute) -> int:
    if qtype not in QUANTS:
        raise OutputError(f"unknown --quant {qtype!r}.", hint=f"Use one of {', '.join(QUANTS)}.")
    base = open_base(base_path)
    if base.folder:
        raise OutputError(f"{base_path}: GGUF output is made from a single-file checkpoint.",
                          hint="Merge the folder to safetensors first, or give the checkpoint file.")
    plan = make_plan(base, loras, arch=arch, block_ratios=block_ratios, drop_unknown=drop_unknown)
    report.architecture, report.layout, report.dropped = plan.architecture, plan.layout, plan.dropped
    prefix = "model.diffusion_model."
    infos = list(base.shards[0].tensors)
    if any(t.name.startswith(prefix) for t in infos):  # a full checkpoint: GGUF holds the denoiser only
        infos = [t for t in infos if t.name.startswith(prefix)]
    gname = {t.name: t.name[len(prefix):] if t.name.startswith(prefix) else t.name for t in infos}
    types = plan_qtypes([(gname[t.name], t.shape, t.dtype) for t in infos], qtype, GGUF_ARCH[plan.architecture])
    entries = [(gname[t.name], q, t.shape, stored) for t, (q, stored) in zip(infos, types)]
    target = {t.name: qs for t, qs in zip(infos, types)}
    kv = {"lorabox.merge": json.dumps(dict(record, quant=qtype), sort_keys=True)}
    fd = os.open(base.shards[0].path, os.O_RDONLY)
    try:
        with GGUFStreamWriter(output, GGUF_ARCH[plan.architecture], entries, kv) as w:
            def step(info, raw):
                q, stored = target[info.name]
                t = Tensor(np.frombuffer(raw, dtype=storage_dtype(info.dtype)).reshape(info.shape), info.dtype)
                return compute.gguf(info, t, plan.patches.get(info.name, []), q, stored)

            _stream(base.shards[0].path, fd, [(t, t.offset, t.nbytes) for t in infos], step, w, plan, report, tick,
                    gname)
    finally:
        os.close(fd)
    return output.stat().st_size


def _check_requantizable(path: Path, patched: list) -> None:
    """Before anything is written: every patched tensor's type is one lorabox can encode again."""
    from ..quant.gguf_quants import QTYPES

    other = sorted({t.qtype for t in patched if t.qtype not in QTYPES + ("F32", "F16", "BF16")})
    if other:
        names = [t.name for t in patched if t.qtype in other]
        raise OutputError(f"{path}: the LoRA patches {len(names)} tensor(s) of type {', '.join(other)} "
                          f"(first: {names[0]}), which lorabox cannot quantize again.",
                          hint=f"Merge into the safetensors checkpoint and write GGUF with --quant "
                               f"({', '.join(QUANTS)}), or use a base of those types.")


def _stream(path: Path, fd: int, items: list, step, writer: GGUFStreamWriter, plan, report, tick,
            names: dict | None = None) -> None:
    """Read ahead (a thread), `step` each tensor here (its block work on the compute's workers), write behind (a
    thread), with bounded bytes in flight, as the safetensors merge streams: reading, quantizing and writing
    overlap rather than take turns. The base's sha256 is taken on the reading thread (`_read_in_order`) and filled
    into the output's record at the end. `items`: (tensor, offset, nbytes) in output order; `names`: the output's
    name of each input tensor, where they differ."""
    def write(job):
        key, data, nbytes = job
        writer.write(key, data)
        tick(nbytes)

    offsets = [offset for _, offset, _ in items]
    in_order = offsets == sorted(offsets)  # no writer we know reorders
    digest = digests.WhileReading(path, fd, in_order=in_order)
    reader = direct.open_reader(path, digest.before.st_size) if in_order else None
    try:
        reads = _read_in_order(path, fd, items, digest.hasher, reader)
        ahead = prefetch(reads, READ_AHEAD if reader is None else READ_AHEAD - direct.AHEAD,
                         lambda item: item[0].nbytes)
        with contextlib.closing(ahead), Behind(write, WRITE_BEHIND) as behind:
            for info, raw in timed_items(ahead, report.stages, "waiting for reads"):
                with timed(report.stages, "computing"):
                    data = step(info, raw)
                patches = plan.patches.get(info.name)
                release(factors(patches or []))  # merged: a LoRA's pages go, as in the engine
                report.tensors += 1
                report.merged += bool(patches)
                with timed(report.stages, "waiting for writes"):
                    behind.put(((names or {}).get(info.name, info.name), data, info.nbytes), data.nbytes)
    finally:
        if reader is not None:
            reader.close()
            report.base_from_page_cache += reader.from_cache
    writer.fill(digests.PENDING, digest.finish())


HASH_STEP = 16 << 20  # bytes per read of what lies between (or after) the tensors a merge reads, when hashing


def _read_in_order(path: Path, fd: int, items: list, hasher, reader: direct.DirectReader | None = None):
    """(tensor, uint8 bytes) for each (tensor, offset, nbytes) of `items`; with `hasher`, every byte of the file
    goes through it in order, the header, padding and tensors the merge skips included (`items` in file order).
    With a `reader`, a file too big for the page cache to keep is read around it, in runs (`direct.read_runs`).
    Otherwise tensors are read into recycled buffers (`BufferPool`): a fresh buffer is fresh memory, zeroed and
    faulted in page by page (a FLUX.1 --quant Q8_0 merge spent 41 system CPU-s)."""
    if reader is not None:
        yield from direct.read_runs(reader, items, os.fstat(fd).st_size, path, hasher)
        return
    pool = BufferPool(keep=direct.READ_KEEP)
    scratch = np.empty(min(HASH_STEP, os.fstat(fd).st_size), np.uint8) if hasher is not None else None

    def skip_to(end: int) -> None:
        for at in range(pos, end, HASH_STEP):
            hasher.update(pread_exact(fd, min(HASH_STEP, end - at), at, path=path, what="the file", into=scratch))

    pos = 0
    for item, offset, nbytes in items:
        if hasher is not None:
            skip_to(offset)
        buf = pool.empty((nbytes,), np.uint8)
        pread_exact(fd, nbytes, offset, path=path, what=f"tensor {item.name!r}", into=buf)
        if hasher is not None:
            hasher.update(buf)
        pos = offset + nbytes
        yield item, buf
    if hasher is not None:
        skip_to(os.fstat(fd).st_size)
