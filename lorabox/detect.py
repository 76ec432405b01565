"""Architecture and dialect from keys and shapes (never from the file name).

Every architecture's tables try to explain every key; the ones that explain all of them are ranked by
fingerprints (published widths, e.g. the cross-attention context of SD1.5 768 vs SDXL 2048) and then by
the file's own metadata. A tie that nothing breaks is an error asking for `--arch`.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from .dialects import parse_key
from .errors import NotALoraError, UnknownArchitecture
from .keymap import architecture_names, load_architecture
from .tensor import Tensor

# what a file's metadata says its base is, normalised to lorabox names (kohya, ai-toolkit, modelspec)
METADATA_HINTS = {
    "sd_v1": "sd15", "sd_1.5": "sd15", "stable-diffusion-v1": "sd15",
    "sdxl_base_v1-0": "sdxl", "sdxl_1.0": "sdxl", "stable-diffusion-xl-v1-base": "sdxl",
    "flux1": "flux1", "flux.1": "flux1", "flux-1-dev": "flux1", "flux-1-schnell": "flux1",
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


def metadata_hint(metadata: dict[str, str]) -> str | None:
    for key in ("modelspec.architecture", "ss_base_model_version"):
        value = metadata.get(key, "").split("/")[0].strip().lower()
        if value in METADATA_HINTS:
            return METADATA_HINTS[value]
    return None


def fingerprint(arch_name: str, tensors: dict[str, Tensor]) -> tuple[int, list[str]]:
    """(matches, mismatches) of the LoRA's shapes against the architecture's published widths."""
    arch = load_architecture(arch_name)
    matches, mismatches = 0, []
    for key, t in tensors.items():
        p = parse_key(key, arch)
        if p is None or p.role not in ("down", "up") or p.hit.part is not None:
            continue
        table = arch.components[p.component].table
        for fp in table.fingerprints:
            if not fnmatch.fnmatchcase(p.hit.module.canonical, fp["module"]):
                continue
            if (fp["axis"] == "in") != (p.role == "down"):
                continue
            size = t.shape[1] if p.role == "down" else t.shape[0]
            want = table.dims[fp["dim"]]
            if size == want:
                matches += 1
            else:
                mismatches.append(f"{key}: {fp['dim']} {size}, published {arch_name} has {want}")
    return matches, mismatches


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
        raise UnknownArchitecture(f"{source}: the keys fit {names} equally well.", hint="Pass --arch to choose.")
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
