"""GGUF on either side of a merge. A GGUF base keeps its types: patched tensors are dequantized, merged in
float64, rounded to float32 and quantized again to their own type; untouched tensors are copied byte for byte.
`--quant QTYPE` writes a safetensors base as GGUF with ComfyUI-GGUF's conventions (names without
`model.diffusion_model.`, which tensors stay F32/F16/BF16, reshapes with `comfy.gguf.orig_shape`)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..errors import OutputError, UnknownArchitecture
from ..io.files import pread_exact
from ..io.gguf import GGUFStreamWriter, encode, open_gguf, plan_qtypes
from ..io.safetensors import release
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
                    process) -> int:
    g = open_gguf(base_path)
    try:
        name = arch or LORABOX_ARCH.get(g.architecture or "")
        if name is None:
            raise UnknownArchitecture(f"{base_path}: GGUF architecture {g.architecture!r} has no key map.",
                                      hint=f"lorabox merges into {', '.join(sorted(LORABOX_ARCH))} GGUF files.")
        view = SimpleNamespace(path=base_path, tensors={t.name: t for t in g.tensors})
        plan = make_plan(view, loras, arch=name, block_ratios=block_ratios, drop_unknown=drop_unknown)
        report.architecture, report.layout, report.dropped = plan.architecture, "gguf", plan.dropped
        kv = dict(g.kv, **{"lorabox.merge": json.dumps(record, sort_keys=True)})
        entries = [(t.name, t.qtype, t.shape, t.stored_shape) for t in g.tensors]
        with GGUFStreamWriter(output, g.architecture, entries, kv, g.kv_types) as w:
            for t in g.tensors:
                patches = plan.patches.get(t.name)
                if patches:
                    merged = process(SimpleNamespace(name=t.name), Tensor(g.read(t), "F32"), patches, "F32")
                    release(factors(patches))  # as the engine does
                    w.write(t.name, encode(merged.array, t.qtype, t.stored_shape))
                else:
                    w.write(t.name, g.read_raw(t))
                report.tensors += 1
                report.merged += bool(patches)
                tick(t.nbytes)
    finally:
        g.close()
    return output.stat().st_size


def merge_to_gguf(base_path: Path, loras, output: Path, qtype: str, *, arch, block_ratios, drop_unknown, record,
                  report, tick, process) -> int:
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
    kv = {"lorabox.merge": json.dumps(dict(record, quant=qtype), sort_keys=True)}
    fd = os.open(base.shards[0].path, os.O_RDONLY)
    try:
        with GGUFStreamWriter(output, GGUF_ARCH[plan.architecture], entries, kv) as w:
            for info, (q, stored) in zip(infos, types):
                t = _pread(fd, info)
                patches = plan.patches.get(info.name, [])
                values = process(info, t, patches, "F32").array if patches else t.values32()
                release(factors(patches))
                w.write(gname[info.name], encode(values, q, stored))
                report.tensors += 1
                report.merged += bool(patches)
                tick(info.nbytes)
    finally:
        os.close(fd)
    return output.stat().st_size


def _pread(fd: int, info) -> Tensor:
    buf = pread_exact(fd, info.nbytes, info.offset, path=info.file, what=f"tensor {info.name!r}")
    return Tensor(np.frombuffer(buf, dtype=storage_dtype(info.dtype)).reshape(info.shape), info.dtype)
