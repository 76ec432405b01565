"""Aim: which adapters land on which base weights, and on which of their rows.

A base checkpoint spells each component in a layout of its architecture's table (`[layouts]`): canonical names
(the weight is the whole canonical module) or diffusers names (a split module is several weights). Every
(adapter, base weight) pair becomes a Patch with a row map: for each row of the base weight, the row of the
adapter's delta that lands there (or -1). Slices, fusions and row transforms (swap_halves) are all row maps.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np

from ..errors import ShapeMismatch, UnknownArchitecture, UnmappedKeysError
from ..keymap import Architecture, Module, architecture_names, load_architecture
from ..lora import Adapter, Lora
from ..ops import ROW_OPS
from .base import BaseCheckpoint


@dataclass(frozen=True)
class Slot:
    """A base weight (or bias) in table terms."""

    component: str
    module: Module
    part: int | None  # the diffusers slice this base weight is, for split modules in a diffusers layout
    naming: str
    bias: bool = False
    rows: tuple[int, int] | None = None  # (i, n): the module is the i-th of n equal row blocks of this weight


@dataclass
class Patch:
    adapter: Adapter
    ratio: float
    row_map: np.ndarray | None  # base row -> adapter delta row (-1: not touched); None: identity
    lora_index: int


def factors(patches: list[Patch]):
    """The arrays of every tensor of the patches' adapters: what a merged weight no longer needs (`release`)."""
    return (t.array for p in patches for t in p.adapter.tensors.values())


@dataclass
class Plan:
    architecture: str
    layout: str
    patches: dict[str, list[Patch]] = field(default_factory=dict)  # base key -> patches in LoRA order
    dropped: list[str] = field(default_factory=list)  # adapters that land nowhere (with drop_unknown)


def base_slots(arch: Architecture, layout_name: str) -> dict[str, list[Slot]]:
    """Base key -> the table modules stored there (several when a checkpoint fuses modules the table keeps
    apart, as OpenCLIP's in_proj_weight holds q, k and v)."""
    out: dict[str, list[Slot]] = {}
    for comp_name, spec in arch.layouts[layout_name].items():
        table, naming, prefix = arch.components[comp_name].table, spec["naming"], spec["prefix"]
        if naming in table.spellings:
            for b in table.spellings[naming]:
                module = table.modules[b.canonical]
                out.setdefault(prefix + b.weight, []).append(Slot(comp_name, module, None, naming, rows=b.part))
                out.setdefault(prefix + b.bias, []).append(Slot(comp_name, module, None, naming, True, b.part))
            continue
        for module in table.modules.values():
            if naming == "canonical":
                names = [(module.canonical, None)]
            else:
                names = [(d, i if module.split else None) for i, d in enumerate(module.diffusers)]
            for name, part in names:
                out.setdefault(prefix + name + ".weight", []).append(Slot(comp_name, module, part, naming))
                out.setdefault(prefix + name + ".bias", []).append(Slot(comp_name, module, part, naming, bias=True))
    return out


def detect_base(base: BaseCheckpoint, arch: str | None = None) -> tuple[str, str, dict[str, list[Slot]]]:
    """(architecture, layout, slots) explaining the most of the base's weights."""
    keys = set(base.tensors)
    best = None
    for name in [arch] if arch else architecture_names():
        spec = load_architecture(name)
        for layout in spec.layouts:
            slots = base_slots(spec, layout)
            hits = sum(1 for k in keys if k in slots and not slots[k][0].bias)
            if best is None or hits > best[0]:
                best = (hits, name, layout, slots)
    if best is None or best[0] == 0:
        sample = ", ".join(sorted(keys)[:3])
        known = ", ".join(load_architecture(n).title for n in architecture_names())
        raise UnknownArchitecture(f"{base.path}: no key map explains this checkpoint's weights (keys like {sample}).",
                                  hint=f"lorabox merges into {known} checkpoints.")
    return best[1], best[2], best[3]


def _rows_of_parts(total: int, split: tuple[int, ...]) -> list[tuple[int, int]]:
    unit = total // sum(split)
    bounds, r = [], 0
    for p in split:
        bounds.append((r, r + unit * p))
        r += unit * p
    return bounds


def _delta_rows(a: Adapter) -> int:
    shape = a.delta_shape()
    if shape is not None:
        return shape[0]
    return next(a.tensors[role].shape[0] for role in ("magnitude", "dora_scale", "diff_b") if role in a.tensors)


def block_ratio(module: str, patterns: list[tuple[str, float]]) -> float:
    """The product of the ratios of every pattern (fnmatch on canonical names) the module matches."""
    r = 1.0
    for pattern, value in patterns:
        if fnmatch.fnmatchcase(module, pattern):
            r *= value
    return r


def make_plan(base: BaseCheckpoint, loras: list[tuple[Lora, float]], *, arch: str | None = None,
              block_ratios: list[tuple[str, float]] = (), drop_unknown: bool = False,
              check_shapes: bool = True) -> Plan:
    """Which adapters land on which base weights. A LoRA for another architecture, adapters that land nowhere
    (unless `drop_unknown`) and, with `check_shapes`, a delta that does not fit its weight raise before any work."""
    arch_name, layout, slots = detect_base(base, arch)
    spec = load_architecture(arch_name)
    infos = base.tensors
    plan = Plan(arch_name, layout)
    # index the base's slots by (component, canonical module)
    by_module: dict[tuple[str, str], list[tuple[str, Slot]]] = {}
    for key, key_slots in slots.items():
        if key in infos:
            for slot in key_slots:
                by_module.setdefault((slot.component, slot.module.canonical), []).append((key, slot))
    lost = []
    for index, (lora, ratio) in enumerate(loras):
        if lora.architecture != arch_name:
            raise UnknownArchitecture(
                f"LoRA #{index + 1} is for {lora.architecture}, the base is {arch_name} ({spec.title}).",
                hint="Merge a LoRA made for this base.")
        for a in lora.adapters.values():
            targets = by_module.get((a.component, a.module), [])
            r = ratio * block_ratio(a.module, block_ratios)
            hit = False
            for key, slot in targets:
                if slot.bias and "diff_b" not in a.tensors:
                    continue
                if not slot.bias and a.kind == "full" and "diff" not in a.tensors:
                    continue
                row_map = _row_map(a, slot, infos[key].shape[0])
                if row_map is not None and not (row_map >= 0).any():
                    continue
                if check_shapes:
                    _check_fits(a, key, infos[key].shape, row_map, slot.bias)
                plan.patches.setdefault(key, []).append(Patch(a, r, row_map, index))
                hit = True
            if not hit:
                lost.append(f"{a.component}:{a.module}" + ("" if a.part is None else f"[slice {a.part}]"))
    if lost and not drop_unknown:
        raise UnmappedKeysError(
            f"{base.path}: {len(lost)} adapter(s) land on no weight of this checkpoint ({layout} layout): "
            + ", ".join(lost[:8]) + (f" and {len(lost) - 8} more" if len(lost) > 8 else "") + ".",
            lost, hint="Pass --drop-unknown to merge without them (they are reported).")
    plan.dropped = lost
    return plan


def _check_fits(a: Adapter, key: str, shape: tuple[int, ...], row_map: np.ndarray | None, bias: bool) -> None:
    """An adapter whose delta does not fit the base weight (a LoRA for another size of the model) stops the merge
    before anything is written; the delta's shape comes from its factors' shapes (`Adapter.delta_shape`)."""
    dims = (a.tensors["diff_b"].shape if "diff_b" in a.tensors else None) if bias else a.delta_shape()
    if dims is None:
        return
    rows, n_in = dims[0], int(np.prod(dims[1:], dtype=np.int64))
    base_in = int(np.prod(shape[1:], dtype=np.int64))
    need = shape[0] if row_map is None else int(row_map.max()) + 1
    if n_in != base_in or rows < need or (row_map is None and rows != shape[0]):
        raise ShapeMismatch(f"{a.component}:{a.module}: the LoRA's delta is {rows} x {n_in}, the base weight {key} is "
                            f"{shape[0]} x {base_in}: a LoRA for another size of this model.",
                            hint="Merge a LoRA made for this checkpoint.")


def _row_map(a: Adapter, slot: Slot, rows: int) -> np.ndarray | None:
    m = slot.module
    if slot.rows is not None:  # one of n equal row blocks of a fused base weight (a.part is None: no split)
        i, n = slot.rows
        start, size = rows // n * i, rows // n
        row_map = np.full(rows, -1, dtype=np.int64)
        row_map[start:start + size] = np.arange(size)
        return row_map
    if slot.naming == "canonical" or not m.split:
        if a.part is None:
            row_map = None
        else:  # a slice adapter on the whole weight
            start, end = _rows_of_parts(rows, m.split)[a.part]
            row_map = np.full(rows, -1, dtype=np.int64)
            row_map[start:end] = np.arange(end - start)
        if slot.naming == "diffusers" and m.op:  # the base keeps this weight in the diffusers row order
            canonical_rows = ROW_OPS[m.op][0](rows)
            row_map = canonical_rows if row_map is None else row_map[canonical_rows]
        return row_map
    # a diffusers layout with the module split into several weights: this weight is slice `slot.part`
    if a.part is not None:
        return None if a.part == slot.part else np.full(rows, -1, dtype=np.int64)
    start, end = _rows_of_parts(_delta_rows(a), m.split)[slot.part]
    return np.arange(start, end)


def base_variant(base: BaseCheckpoint, architecture: str) -> str | None:
    """The variant of `architecture` (e.g. "flux2_klein_9b") a base checkpoint is, from the modules it has and their
    shapes, as `detect.lora_variant` does for a LoRA; None when the architecture has no variants or nothing fits."""
    from ..detect import check_widths, variant_dims

    spec = load_architecture(architecture)
    _, _, slots = detect_base(base, architecture)
    modules, widths = set(), []
    for key, info in base.tensors.items():
        for slot in slots.get(key, ()):
            if slot.bias or len(info.shape) < 2:
                continue
            table = spec.components[slot.component].table
            if slot.component == "unet":
                modules.add(slot.module.canonical)
            widths.append((key, table, slot.module.canonical, "in", info.shape[1]))
            if slot.part is None and slot.rows is None:
                widths.append((key, table, slot.module.canonical, "out", info.shape[0]))
    fits = [name for name, v in spec.unet.table.variants.items()
            if modules <= v.modules and not check_widths(widths, lambda t, n=name: variant_dims(t, n), name)[1]]
    return fits[0] if len(fits) == 1 else None
