"""Architecture and dialect from keys and shapes (never from the file name).

Every architecture's tables try to explain every key; the ones that explain all of them are ranked by
fingerprints (published widths, e.g. the cross-attention context of SD1.5 768 vs SDXL 2048) and then by
the file's own metadata. A tie that nothing breaks is an error asking for `--arch`.

A table with variants (sizes of one family, e.g. FLUX.2 dev / Klein 4B / Klein 9B) is fingerprinted against each;
`lora_variant` names the one whose modules (block indices) and widths fit the LoRA.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from .dialects import parse_key
from .errors import NotALoraError, UnknownArchitecture
from .keymap import Table, architecture_names, fingerprint_width, load_architecture
from .tensor import Tensor

# what a file's metadata says its base is, normalised to lorabox names (kohya, ai-toolkit, modelspec)
METADATA_HINTS = {
    "sd_v1": "sd15", "sd_1.5": "sd15", "stable-diffusion-v1": "sd15",
    "sdxl_base_v1-0": "sdxl", "sdxl_1.0": "sdxl", "stable-diffusion-xl-v1-base": "sdxl",
    "flux1": "flux1", "flux.1": "flux1", "flux-1-dev": "flux1", "flux-1-schnell": "flux1",
    # ai-toolkit arch names, and the modelspec ids lorabox gives FLUX.2 (key_maps/flux2.toml)
    "flux2": "flux2", "flux2_klein_4b": "flux2", "flux2_klein_9b": "flux2",
    "flux-2-dev": "flux2", "flux-2-klein-4b": "flux2", "flux-2-klein-9b": "flux2",
    "stable-diffusion-v3-medium": "sd3", "stable-diffusion-v3.5-medium": "sd3", "sd3": "sd3",
    "stable-diffusion-v3.5-large": "sd35_large",
    # musubi-tuner writes modelspec.architecture `wan2.1/lora` for every Wan it trains (Wan2.2 too), so these name
    # the architecture only; lorabox's own Wan modelspec ids (key_maps/wan.toml) name the variant as well
    "wan2.1": "wan", "wan2.2": "wan", "wan": "wan",
    "wan-2.1-t2v-1.3b": "wan", "wan-2.1-t2v-14b": "wan", "wan-2.1-i2v-14b": "wan", "wan-2.2-ti2v-5b": "wan",
    "wan-2.2-t2v-a14b": "wan", "wan-2.2-i2v-a14b": "wan",
}
# the same hints, for the variant of an architecture whose table has variants
VARIANT_HINTS = {
    "flux2": "flux2_dev", "flux2_klein_4b": "flux2_klein_4b", "flux2_klein_9b": "flux2_klein_9b",
    "flux-2-dev": "flux2_dev", "flux-2-klein-4b": "flux2_klein_4b", "flux-2-klein-9b": "flux2_klein_9b",
}


@dataclass
class Candidate:
    architecture: str
    parsed: int
    unknown: list[str]
    matches: int = 0
    mismatches: list[str] = field(default_factory=list)
    hinted: bool = False

    def rank(self) -> tuple:
        return (not self.unknown, self.parsed, -len(self.mismatches), self.hinted, self.matches)


def _metadata_values(metadata: dict[str, str]) -> list[str]:
    return [metadata.get(key, "").split("/")[0].strip().lower()
            for key in ("modelspec.architecture", "ss_base_model_version")]


def metadata_hint(metadata: dict[str, str]) -> str | None:
    for value in _metadata_values(metadata):
        if value in METADATA_HINTS:
            return METADATA_HINTS[value]
    return None


def _widths(arch_name: str, tensors: dict[str, Tensor]):
    """(key, component table, canonical module, axis, size) of every down/up tensor a fingerprint could check.
    A slice (a diffusers q of a fused qkv) has the whole weight's input width but only part of its rows."""
    arch = load_architecture(arch_name)
    for key, t in tensors.items():
        p = parse_key(key, arch)
        if p is None or p.role not in ("down", "up") or len(t.shape) < 2:
            continue
        axis = "in" if p.role == "down" else "out"
        if axis == "out" and p.hit.part is not None:
            continue
        yield key, arch.components[p.component].table, p.hit.module.canonical, axis, t.shape[1 if axis == "in" else 0]


def check_widths(widths, dims_of, label: str) -> tuple[int, list[str]]:
    """(matches, mismatches) of the widths against the dims `dims_of(table)` gives for each component table."""
    matches, mismatches = 0, []
    for key, table, module, axis, size in widths:
        dims = dims_of(table)
        for fp in table.fingerprints:
            if fp["axis"] != axis or not fnmatch.fnmatchcase(module, fp["module"]):
                continue
            want = fingerprint_width(fp, dims)
            if size == want:
                matches += 1
            else:
                mismatches.append(f"{key}: {fp['dim']} = {size}, published {label} has {want}")
    return matches, mismatches


def variant_dims(table: Table, variant: str | None) -> dict[str, int]:
    return table.variants[variant].dims if variant in table.variants else table.dims


def fingerprint(arch_name: str, tensors: dict[str, Tensor]) -> tuple[int, list[str]]:
    """(matches, mismatches) of the LoRA's shapes against the architecture's published widths; for a table with
    variants, against the variant that fits best."""
    widths = list(_widths(arch_name, tensors))
    variants = list(load_architecture(arch_name).unet.table.variants) or [None]
    results = [check_widths(widths, lambda t, v=v: variant_dims(t, v), v or arch_name) for v in variants]
    return min(results, key=lambda r: (len(r[1]), -r[0]))


def lora_variant(tensors: dict[str, Tensor], metadata: dict[str, str], architecture: str) -> str | None:
    """The variant of `architecture` a LoRA was made for (e.g. "flux2_klein_4b"), from its block indices, its shapes
    and then its metadata; None when they cannot tell or the architecture has no variants."""
    arch = load_architecture(architecture)
    variants = arch.unet.table.variants
    if not variants:
        return None
    modules = set()
    for key in tensors:
        p = parse_key(key, arch)
        if p is not None and p.component == "unet":
            modules.add(p.hit.module.canonical)
    widths = list(_widths(architecture, tensors))
    fits = {}  # variants with every module of the LoRA and no width that disagrees
    for name, v in variants.items():
        if not modules <= v.modules:
            continue
        if not check_widths(widths, lambda t, v=name: variant_dims(t, v), name)[1]:
            fits[name] = v
    if len(fits) == 1:
        return next(iter(fits))
    by_modelspec = {v.modelspec: name for name, v in variants.items() if v.modelspec}
    hinted = [VARIANT_HINTS.get(v, by_modelspec.get(v)) for v in _metadata_values(metadata)]
    hinted = [v for v in hinted if v in fits]
    return hinted[0] if hinted else None


def candidates(tensors: dict[str, Tensor], metadata: dict[str, str]) -> list[Candidate]:
    hint = metadata_hint(metadata)
    out = []
    for name in architecture_names():
        arch = load_architecture(name)
        unknown = [k for k in tensors if parse_key(k, arch) is None]
        c = Candidate(name, len(tensors) - len(unknown), unknown, hinted=(hint == name))
        if c.parsed:
            c.matches, c.mismatches = fingerprint(name, tensors)
        out.append(c)
    return sorted(out, key=Candidate.rank, reverse=True)


def detect_architecture(tensors: dict[str, Tensor], metadata: dict[str, str], *, source: str = "input") -> str:
    if not tensors:
        raise NotALoraError(f"{source}: holds no tensors.")
    ranked = candidates(tensors, metadata)
    best = ranked[0]
    if best.parsed == 0:
        raise NotALoraError(f"{source}: " + describe_unknown(tensors))
    tied = [c for c in ranked if c.rank() == best.rank()]
    if len(tied) > 1:
        names = " or ".join(c.architecture for c in tied)
        error = UnknownArchitecture(f"{source}: the keys fit {names} equally well.", hint="Pass --arch to choose.")
        error.candidates = [c.architecture for c in tied]  # a merge breaks the tie with its base's architecture
        raise error
    return best.architecture


def describe_unknown(tensors: dict[str, Tensor]) -> str:
    """What a file that no table explains looks like, and what was missing."""
    from .dialects import _suffixes

    sample = ", ".join(sorted(tensors)[:3])
    lora_keys = [k for k in tensors if any(k.endswith(sfx) for sfx, _, _ in _suffixes())]
    known = ", ".join(architecture_names())
    if not lora_keys:
        return (f"no LoRA tensors (no key ends in .lora_down.weight, .lora_A.weight, .alpha, .hada_w1_a, ...); "
                f"keys look like {sample}. It looks like a full model checkpoint or another kind of file, not a LoRA.")
    return (f"{len(lora_keys)} of {len(tensors)} keys are spelled like LoRA tensors, but no key map "
            f"({known}) names their modules; keys look like {sample}. It may be a LoRA for an architecture lorabox "
            f"has no table for yet.")
