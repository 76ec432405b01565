"""Reading any dialect into the canonical model, and writing the canonical model out as one dialect.

A key is `<prefix><module><suffix>`. The parts are orthogonal and all data: suffixes and the written
dialects are in key_maps/dialects.toml, prefixes and module names in each architecture's table. A
flattened name (after a prefix ending in `_`) is resolved by lookup in the table's flattened spellings,
never by guessing which `_` was a `.`.
"""
from __future__ import annotations

import difflib
import functools
import json
from collections import Counter
from dataclasses import dataclass

import numpy as np

from . import ops
from .errors import ShapeMismatch, UnmappedKeysError, UnsupportedConversion
from .keymap import Architecture, Component, Hit, load_architecture, load_dialects
from .lora import LOHA_ROLES, LOKR_ROLES, Adapter, Lora
from .tensor import Tensor

WRITE_DIALECTS = ("kohya", "diffusers", "comfyui", "bfl")
PEFT_METADATA_KEY = "lora_adapter_metadata"
FOLDED_ALPHA_KEY = "lorabox.folded_alpha"  # how alphas were folded into a file without alphas, to undo it on read


@dataclass(frozen=True)
class ParsedKey:
    key: str
    component: str
    hit: Hit
    role: str
    spelling: str  # a short description of the prefix family, for reports


@functools.lru_cache(maxsize=None)
def _suffixes() -> list[tuple[str, str, str]]:
    out = []
    for suffix, spec in load_dialects()["suffixes"].items():
        role, tail = (spec, "") if isinstance(spec, str) else (spec["role"], spec.get("module", ""))
        out.append((suffix, role, tail))
    return sorted(out, key=lambda x: -len(x[0]))


@functools.lru_cache(maxsize=None)
def _prefixes(arch_name: str) -> list[tuple[str, Component]]:
    arch = load_architecture(arch_name)
    pairs = [(p, c) for c in arch.components.values() for p in c.all_prefixes()]
    pairs.append(("", arch.unet))  # bare original/BFL names, and xlabs
    return sorted(pairs, key=lambda x: -len(x[0]))


def parse_key(key: str, arch: Architecture) -> ParsedKey | None:
    """Resolve one tensor key against an architecture; None if it means nothing there."""
    return _parse_key(key, arch.name)


@functools.lru_cache(maxsize=65536)
def _parse_key(key: str, arch_name: str) -> ParsedKey | None:
    for name, role in _split_suffix(key):
        for prefix, comp in _prefixes(arch_name):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            index = comp.table.flat if prefix.endswith("_") else comp.table.dotted
            hit = index.get(rest)
            if hit is not None:
                return ParsedKey(key, comp.name, hit, role, prefix or "(bare)")
    return None


@functools.lru_cache(maxsize=65536)
def _split_suffix(key: str) -> tuple[tuple[str, str], ...]:
    """(module name, role) for each suffix the key ends with, longest first; shared by every architecture tried
    (detection parses each key against all of them)."""
    return tuple((key[: -len(suffix)] + tail, role) for suffix, role, tail in _suffixes() if key.endswith(suffix))


def read_state_dict(sd: dict[str, Tensor], arch: Architecture, metadata: dict[str, str] | None = None, *,
                    drop_unknown: bool = False, source: str = "input") -> Lora:
    """Build the canonical Lora from a state dict of any dialect of `arch`.

    Strict: keys that resolve to nothing raise UnmappedKeysError listing them, unless `drop_unknown`.
    """
    metadata = dict(metadata or {})
    lora = Lora(arch.name, metadata=metadata)
    unknown, seen, spellings = [], {}, Counter()
    raw: dict[tuple, dict] = {}
    for key, tensor in sd.items():
        p = parse_key(key, arch)
        if p is None:
            unknown.append(key)
            continue
        slot = (p.component, p.hit.module.canonical, p.hit.part, p.hit.naming)
        entry = raw.setdefault(slot, {"tensors": {}, "hit": p.hit})
        if p.role in entry["tensors"] or (p.role, slot[:3]) in seen:
            raise UnmappedKeysError(
                f"{source}: {key!r} and {seen.get((p.role, slot[:3]), 'another key')!r} hold the same tensor.",
                [key], hint="The file mixes two spellings of one adapter; remove one of them.",
            )
        seen[(p.role, slot[:3])] = key
        entry["tensors"][p.role] = tensor
        spellings[_spelling_name(p)] += 1
    if unknown and not drop_unknown:
        raise _unmapped(unknown, arch, source)
    lora.dropped = sorted(unknown)
    peft_meta = _peft_metadata(metadata)
    folded = _json(metadata.get(FOLDED_ALPHA_KEY))
    for (component, _module, part, naming), entry in raw.items():
        tensors = entry["tensors"]
        hit: Hit = entry["hit"]
        alpha = tensors.pop("alpha", None)
        if not any(r != "alpha" for r in tensors):
            continue  # a stray alpha with no factors: nothing to apply (kohya writes these for skipped layers)
        adapter = Adapter(component, hit.module.canonical, part, tensors, alpha)
        if alpha is None and folded and _record_key(adapter) in folded:
            entry = folded[_record_key(adapter)]
            restored = ops.unfold_alpha(adapter, Tensor.from_values(
                np.full(entry["shape"], entry["alpha"], dtype=np.float64), entry["dtype"]), entry["factors"], entry["dtypes"])
            adapter = restored or adapter
        elif alpha is None and peft_meta and adapter.kind == "lora":
            adapter.alpha = _peft_alpha(peft_meta, arch.components[component], hit, adapter)
        _check_shapes(adapter, source)
        if naming == "diffusers":
            adapter = ops.apply_row_op(adapter, hit.module.op, inverse=True)
        lora.add(adapter)
    if not lora.adapters:
        from .errors import NotALoraError

        raise NotALoraError(f"{source}: no LoRA tensors found.")
    names = [name for name, _ in spellings.most_common()]
    # "kohya" of the text encoders is already said by "kohya (original names)" of the denoiser
    lora.dialect = ", ".join(n for n in names if not any(m != n and m.startswith(n + " (") for m in names))
    return lora


_FAMILIES = (("lora_transformer_", "onetrainer"), ("lora_", "kohya"), ("lycoris_", "lycoris"),
             ("diffusion_model.", "comfyui"), ("text_encoders.", "comfyui"), ("base_model.model.", "peft"))


def _spelling_name(p: ParsedKey) -> str:
    """A readable name for how a key is spelled: the prefix family, and for kohya-style flat names which naming."""
    prefix = p.spelling
    family = next((name for start, name in _FAMILIES if prefix.startswith(start)), "diffusers")
    if prefix == "(bare)":
        family = "xlabs" if p.hit.naming == "alias" else "bare original names"
    if family in ("kohya", "lycoris") and p.component == "unet":
        family += " (diffusers names)" if p.hit.naming == "diffusers" else " (original names)"
    return family


def _check_shapes(a: Adapter, source: str) -> None:
    t = a.tensors
    if "down" in t and "up" in t and t["up"].shape[1] != t["down"].shape[0]:
        raise ShapeMismatch(
            f"{source}: {a.module}: up {tuple(t['up'].shape)} and down {tuple(t['down'].shape)} disagree on the rank."
        )
    if ("down" in t) != ("up" in t):
        missing = "up" if "down" in t else "down"
        raise ShapeMismatch(f"{source}: {a.module}: has no `{missing}` tensor to pair with.")


def _unmapped(keys: list[str], arch: Architecture, source: str) -> UnmappedKeysError:
    known = [pre + name for c in arch.components.values() for pre in c.prefixes.values()
             for name in (c.table.flat if pre.endswith("_") else c.table.dotted)]
    lines = []
    for k in sorted(keys)[:8]:
        stem = k.rsplit(".lora", 1)[0].rsplit(".alpha", 1)[0]
        near = difflib.get_close_matches(stem, known, n=1, cutoff=0.6)
        lines.append(f"{k}" + (f" (nearest known: {near[0]})" if near else ""))
    more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
    return UnmappedKeysError(
        f"{source}: {len(keys)} key(s) not understood for {arch.name}: " + "; ".join(lines) + more + ".",
        keys, hint="Pass --drop-unknown to convert without them (they are reported).",
    )


def _peft_metadata(metadata: dict[str, str]) -> dict | None:
    return _json(metadata.get(PEFT_METADATA_KEY))


def _json(raw: str | None) -> dict | None:
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _record_key(a: Adapter) -> str:
    return f"{a.component}:{a.module}" + ("" if a.part is None else f":{a.part}")


def _peft_alpha(meta: dict, comp: Component, hit: Hit, adapter: Adapter) -> Tensor | None:
    """The alpha diffusers would use for this module, from `lora_adapter_metadata` (None = scale 1)."""
    prefix = comp.prefixes["diffusers"]
    cfg = {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}
    if "lora_alpha" not in cfg:
        return None
    name = hit.module.diffusers[hit.part or 0] if hit.naming == "diffusers" else hit.module.canonical
    alpha = cfg["lora_alpha"]
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if name == pattern or name.endswith("." + pattern):
            alpha = value
    r = adapter.rank
    if cfg.get("use_rslora"):
        alpha = alpha * r ** 0.5  # rsLoRA scales by alpha/sqrt(r); the same delta as kohya alpha*sqrt(r)
    if float(alpha) == float(r):
        return None
    return Tensor.scalar(float(alpha))


# --- writing -----------------------------------------------------------------------------------------

def write_state_dict(lora: Lora, arch: Architecture, dialect: str) -> tuple[dict[str, Tensor], dict[str, str], list[str]]:
    """Spell `lora` in `dialect`. Returns (state dict, metadata to add, notes on what changed)."""
    if dialect not in WRITE_DIALECTS:
        raise UnsupportedConversion(f"unknown target dialect {dialect!r}.", hint=f"Use one of {', '.join(WRITE_DIALECTS)}.")
    spec = load_dialects()["write"][dialect]
    naming = arch.kohya_naming if spec["naming"] == "kohya" else spec["naming"]
    out: dict[str, Tensor] = {}
    notes: list[str] = []
    folded = 0
    record: dict[str, dict] = {}
    for (component, module_name), adapters in sorted(lora.by_module().items()):
        comp = arch.components[component]
        module = comp.table.modules[module_name]
        for a in _regroup(adapters, module, slices=(naming == "diffusers" and module.split is not None)):
            if naming == "diffusers":
                a = ops.apply_row_op(a, module.op)
            if spec["alpha"] == "fold" and a.alpha is not None:
                before = {r: t.dtype for r, t in a.tensors.items()}
                alpha = a.alpha
                a, factors = ops.fold_alpha_with_factors(a)
                if factors:
                    record[_record_key(a)] = {"alpha": float(alpha.values().reshape(-1)[0]), "dtype": alpha.dtype,
                                              "shape": list(alpha.shape), "factors": factors,
                                              "dtypes": {r: before[r] for r in factors}}
                if any(a.tensors[r].dtype != d for r, d in before.items()):
                    folded += 1
            name = module.canonical if naming == "canonical" else module.diffusers[a.part or 0]
            base = _prefix(spec, comp, dialect) + (name.replace(".", "_") if spec["flatten"] else name)
            for suffix, tensor in _roles_for(a, spec, dialect).items():
                out[base + suffix] = tensor
    if folded:
        notes.append(f"{folded} adapter(s) had an alpha/rank that is not a power of two: folded into float32 "
                     f"weights to stay exact (the {dialect} dialect stores no alpha).")
    meta = {}
    if record:
        meta[FOLDED_ALPHA_KEY] = json.dumps(record, sort_keys=True, separators=(",", ":"))
    if spec.get("peft_metadata"):
        meta[PEFT_METADATA_KEY] = json.dumps(_peft_config(out, arch), indent=2, sort_keys=True)
    return out, meta, notes


def _prefix(spec: dict, comp: Component, dialect: str) -> str:
    if spec["prefix"] == "none":
        if comp.name != "unet":
            raise UnsupportedConversion(
                f"the {dialect} dialect has no names for text-encoder adapters ({comp.name}).",
                hint="Write comfyui or kohya to keep them.",
            )
        return ""
    return comp.prefixes[spec["prefix"]]


def _regroup(adapters: list[Adapter], module, *, slices: bool) -> list[Adapter]:
    """The adapters of one module, as whole-weight adapters or as the table's row slices."""
    whole = [a for a in adapters if a.part is None]
    parts = [a for a in adapters if a.part is not None]
    if whole and parts:
        raise UnsupportedConversion(f"{module.canonical}: adapters on both the fused weight and its slices.")
    if not module.split:
        return adapters
    if slices:
        return parts if parts else ops.split(whole[0], module.split, module.canonical)
    if whole:
        return whole
    by_part = {a.part: a for a in parts}
    return [ops.fuse([by_part.get(i) for i in range(len(module.split))], module.split, module.canonical)]


def _roles_for(a: Adapter, spec: dict, dialect: str) -> dict[str, Tensor]:
    t = dict(a.tensors)
    suffixes = dict(spec["suffixes"])
    if spec.get("lycoris"):
        suffixes.update({role: "." + role for role in LOHA_ROLES + LOKR_ROLES})
    # DoRA magnitude: PEFT keeps [out], kohya/LyCORIS/ComfyUI keep dora_scale [out, 1]
    if "magnitude" in t and "magnitude" not in suffixes:
        t["dora_scale"] = t.pop("magnitude").reshape(-1, 1)
    if "dora_scale" in t and "dora_scale" not in suffixes:
        ds = t.pop("dora_scale")
        if ds.ndim != 2 or ds.shape[1] != 1:
            raise UnsupportedConversion(f"{a.module}: DoRA magnitude of shape {tuple(ds.shape)} is on the input axis; "
                                        f"the {dialect} dialect (PEFT) only has output-axis magnitudes.")
        t["magnitude"] = ds.reshape(-1)
    if a.alpha is not None or (spec["alpha"] == "tensor" and a.kind == "lora"):
        if spec["alpha"] == "tensor":
            t["alpha"] = a.alpha if a.alpha is not None else Tensor.scalar(float(a.rank))
    unsupported = sorted(set(t) - set(suffixes))
    if unsupported:
        raise UnsupportedConversion(
            f"{a.module}: the {dialect} dialect cannot store {', '.join(unsupported)}.",
            hint="Write kohya or comfyui, which keep LoHa/LoKr/Tucker/diff tensors as they are.",
        )
    return {suffixes[role]: tensor for role, tensor in t.items()}


def _peft_config(sd: dict[str, Tensor], arch: Architecture) -> dict:
    """`lora_adapter_metadata` as diffusers' save_lora_weights writes it: a LoraConfig per component prefix.

    Alphas are folded into the weights, so every module has scale 1 (lora_alpha = r, patterns mirrored). Module
    names are written as their shortest dotted suffix that no other weight of the table shares: PEFT matches
    targets by suffix, so they fit whether the installed transformers nests CLIP under `text_model.` or not.
    """
    config: dict = {}
    for comp in arch.components.values():
        prefix = comp.prefixes["diffusers"]
        short = _short_names(comp.table.name)
        ranks = {short.get(k[len(prefix):-len(".lora_A.weight")], k[len(prefix):-len(".lora_A.weight")]): t.shape[0]
                 for k, t in sd.items() if k.startswith(prefix) and k.endswith(".lora_A.weight")}
        if not ranks:
            continue
        r = Counter(ranks.values()).most_common(1)[0][0]
        pattern = {k: v for k, v in ranks.items() if v != r}
        cfg = {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
               "target_modules": sorted(ranks), "use_dora": any(k.startswith(prefix) and "magnitude" in k for k in sd),
               "lora_bias": any(k.startswith(prefix) and k.endswith("lora_B.bias") for k in sd)}
        config.update({prefix + k: v for k, v in cfg.items()})
    return config


@functools.lru_cache(maxsize=None)
def _short_names(table_name: str) -> dict[str, str]:
    """diffusers name -> its shortest dotted suffix that ends no other module path of the model: neither another
    diffusers name of the table nor a container above one (PEFT matches targets against every module, so FLUX.2's
    `0.attn.to_out` would also name the ModuleList `transformer_blocks.0.attn.to_out`)."""
    from .keymap import load_table

    names = [d for m in load_table(table_name).modules.values() for d in m.diffusers]
    paths = {tuple(n.split(".")[:j]) for n in names for j in range(1, n.count(".") + 2)}
    counts = Counter(path[-k:] for path in paths for k in range(1, len(path) + 1))
    out = {}
    for n in names:
        parts = n.split(".")
        k = next((k for k in range(1, len(parts) + 1) if counts[tuple(parts[-k:])] == 1), len(parts))
        out[n] = ".".join(parts[-k:])
    return out
