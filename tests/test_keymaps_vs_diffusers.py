"""The key-map tables (key_maps/*.toml) checked against the real models and diffusers' own converters.

1. Diffusers side: at FULL published size (built on the `meta` device, ORACLES.md section 2), the diffusers names
   of a table are exactly the Linear/Conv2d modules of the diffusers model, and every row split / row op of the
   table fits the real shapes.
2. Text encoders: the clip_l / clip_g / t5xxl tables name exactly the Linear modules of transformers' models.
3. Canonical side: diffusers' single-file checkpoint converters (the code that turns an original LDM / SGM / BFL
   checkpoint into diffusers weights) are run on an original checkpoint built from the table's canonical names,
   every weight row tagged with a unique code; each diffusers module must receive exactly the rows the table
   says (its slice of the canonical weight, in order; halves swapped for `swap_halves`).
4. Every spelling of every module (kohya flattened, comfyui dotted, diffusers, aliases) resolves to that module.
"""
from __future__ import annotations

import fnmatch
import functools

import pytest
import torch

from lorabox.dialects import parse_key
from lorabox.keymap import Module, load_architecture

ARCHS = ("sd15", "sdxl", "flux1", "flux2", "sd3", "sd35_large")

# Published configs (ORACLES.md section 2).
SD15 = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
FLUX1_DEV = dict(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                 joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_HIDDEN = 3072
# FLUX.2 sizes as published by BFL's flux2 src/model.py (Flux2Params, Klein9BParams, Klein4BParams; the same numbers in
# ostris/ai-toolkit and kohya-ss/musubi-tuner copies): double blocks, single blocks, heads (x 128 = hidden), context
# (text-encoder width), guidance embedder. Flux2Transformer2DModel's defaults are dev's.
FLUX2 = {
    "flux2_dev": dict(num_layers=8, num_single_layers=48, num_attention_heads=48, joint_attention_dim=15360,
                      guidance_embeds=True),
    "flux2_klein_9b": dict(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288,
                           guidance_embeds=False),
    "flux2_klein_4b": dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                           guidance_embeds=False),
}
FLUX2_COMMON = dict(in_channels=128, attention_head_dim=128, mlp_ratio=3.0)
# SD3 / SD3.5 as published (the diffusers transformer/config.json of stabilityai's repositories): heads = depth,
# caption projection = hidden = 64 x depth; 3.5 Medium adds the second attention in blocks 0-12.
SD3 = {
    "sd3_medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192),
    "sd35_medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                        dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    "sd35_large": dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
                       qk_norm="rms_norm"),
}
SD3_COMMON = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
                  joint_attention_dim=4096, pooled_projection_dim=2048)
# (model, table, variant): the model a table or one of its variants describes
VARIANTS = [(v, "flux2", v) for v in sorted(FLUX2)] + [("sd3_medium", "sd3", "sd3_medium"),
                                                       ("sd35_medium", "sd3", "sd35_medium")]

# Text encoders at published size.
CLIP_L = dict(hidden_size=768, num_hidden_layers=12, intermediate_size=3072, num_attention_heads=12)
CLIP_G = dict(hidden_size=1280, num_hidden_layers=32, intermediate_size=5120, num_attention_heads=20,
              projection_dim=1280)
T5XXL = dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, feed_forward_proj="gated-gelu")

CODE = 100_000  # row r of the module with id i holds i * CODE + r (every module has fewer than CODE rows)


# --- models on `meta` ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def denoiser(arch: str) -> torch.nn.Module:
    from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    if arch.startswith("flux2"):  # "flux2" is the whole table (= dev), "flux2_klein_4b" a variant
        cls, config = Flux2Transformer2DModel, {**FLUX2_COMMON, **FLUX2["flux2_dev" if arch == "flux2" else arch]}
    elif arch.startswith("sd3"):  # "sd3" is the whole table (= 3.5 Medium)
        cls, config = SD3Transformer2DModel, {**SD3_COMMON, **SD3["sd35_medium" if arch == "sd3" else arch]}
    else:
        cls, config = {"sd15": (UNet2DConditionModel, SD15), "sdxl": (UNet2DConditionModel, SDXL),
                       "flux1": (FluxTransformer2DModel, FLUX1_DEV)}[arch]
    with torch.device("meta"):
        return cls(**config)


@functools.lru_cache(maxsize=None)
def text_encoder(table: str) -> torch.nn.Module:
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config,
                              T5EncoderModel)

    with torch.device("meta"):
        if table == "clip_l":
            return CLIPTextModel(CLIPTextConfig(**CLIP_L))
        if table == "clip_g":
            return CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))
        return T5EncoderModel(T5Config(**T5XXL))


def layers(model: torch.nn.Module, kinds=(torch.nn.Linear, torch.nn.Conv2d)) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def rows_cols(m: torch.nn.Module) -> tuple[int, int]:
    if isinstance(m, torch.nn.Linear):
        return m.out_features, m.in_features
    return m.out_channels, m.in_channels


def diffusers_names(modules) -> list[str]:
    return [d for m in modules for d in m.diffusers]


def part_bounds(module: Module, unit: int) -> list[tuple[int, int]]:
    """Rows [start, end) of the canonical weight that each diffusers part holds, per the table."""
    if not module.split:
        return [(0, unit)]
    out, at = [], 0
    for p in module.split:
        out.append((at, at + unit * p))
        at += unit * p
    return out


def unet_modules(arch: str) -> dict[str, Module]:
    return load_architecture(arch).unet.table.modules


# --- 1. diffusers names and shapes at full size -------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_unet_table_names_every_linear_and_conv_once(arch):
    modules = list(unet_modules(arch).values())
    names = diffusers_names(modules)
    assert len(names) == len(set(names)), "a diffusers name appears twice in the table"
    real = layers(denoiser(arch))
    missing, extra = sorted(set(real) - set(names)), sorted(set(names) - set(real))
    assert not missing and not extra, f"not in table: {missing[:10]}; not in model: {extra[:10]}"

    for m in modules:
        shapes = [rows_cols(real[d]) for d in m.diffusers]
        if m.split:
            assert len(m.split) == len(m.diffusers) > 1, m.canonical
            assert len({cols for _, cols in shapes}) == 1, (m.canonical, shapes)
            unit = shapes[0][0] // m.split[0]
            assert [rows for rows, _ in shapes] == [unit * p for p in m.split], (m.canonical, shapes, m.split)
            if arch == "flux1":
                assert unit == FLUX_HIDDEN, (m.canonical, unit)
        else:
            assert len(m.diffusers) == 1, m.canonical
        if m.op is not None:
            assert m.op == "swap_halves", (m.canonical, m.op)
            assert shapes[0][0] % 2 == 0, (m.canonical, shapes)


@pytest.mark.parametrize("model,arch,variant", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_variant_names_every_layer_once(model, arch, variant):
    """A variant's module set (the table expanded with the variant's `vars`) is exactly the published model's layers."""
    v = load_architecture(arch).unet.table.variants[variant]
    names = diffusers_names(unet_modules(arch)[c] for c in v.modules)
    real = layers(denoiser(model))
    assert sorted(names) == sorted(real), sorted(set(names) ^ set(real))[:10]


@pytest.mark.parametrize("variant", sorted(FLUX2))
def test_flux2_variant_dims_are_the_published_ones(variant):
    v = load_architecture("flux2").unet.table.variants[variant]
    assert v.dims["hidden"] == FLUX2[variant]["num_attention_heads"] * FLUX2_COMMON["attention_head_dim"]
    assert v.dims["context"] == FLUX2[variant]["joint_attention_dim"]
    assert v.dims["in_channels"] == FLUX2_COMMON["in_channels"]


FINGERPRINTED = [("flux1", "flux1", None), ("sd35_large", "sd35_large", None)] + VARIANTS


@pytest.mark.parametrize("model,arch,variant", FINGERPRINTED)
def test_fingerprints_are_the_real_widths(model, arch, variant):
    """Every fingerprint (a dim, or an expression such as `9*hidden`) equals the real width of every module it
    names, at full size; and every fingerprint names some module (none is dead)."""
    from lorabox.detect import variant_dims
    from lorabox.keymap import fingerprint_width

    table = load_architecture(arch).unet.table
    dims = variant_dims(table, variant)
    modules = table.variants[variant].modules if variant else table.modules
    real = layers(denoiser(model))
    used = set()
    for name in modules:
        m = table.modules[name]
        rows, cols = sum(rows_cols(real[d])[0] for d in m.diffusers), rows_cols(real[m.diffusers[0]])[1]
        for i, fp in enumerate(table.fingerprints):
            if fnmatch.fnmatchcase(name, fp["module"]):
                used.add(i)
                assert (cols if fp["axis"] == "in" else rows) == fingerprint_width(fp, dims), (name, fp)
    dead = [fp for i, fp in enumerate(table.fingerprints) if i not in used]
    assert not dead, dead


# --- 2. text encoders ----------------------------------------------------------------------------------

def text_tables():
    seen = {}
    for arch in ARCHS:
        for cname, comp in load_architecture(arch).components.items():
            if cname != "unet":
                seen.setdefault(comp.table.name, cname)
    return sorted(seen)


def test_text_tables_are_the_expected_ones():
    assert text_tables() == ["clip_g", "clip_l", "t5xxl"]


@pytest.mark.parametrize("table", ["clip_l", "clip_g", "t5xxl"])
def test_text_encoder_table_names_every_linear_once(table):
    arch = {"clip_l": "sd15", "clip_g": "sdxl", "t5xxl": "flux1"}[table]
    comp = load_architecture(arch).components[table]
    modules = list(comp.table.modules.values())
    names = diffusers_names(modules)
    assert len(names) == len(set(names))
    # Text-encoder canonical names are transformers' own names: the same on both sides, never split.
    assert all(m.diffusers == (m.canonical,) and not m.split and m.op is None for m in modules)

    real = layers(text_encoder(table), torch.nn.Linear)
    if table.startswith("clip"):
        # transformers 5: CLIPTextModel has no `text_model.` level (`encoder.layers.0.self_attn.q_proj`), while
        # CLIPTextModelWithProjection has it (and `text_projection` at the top). LoRA files always spell
        # `text_model.encoder...`, as the tables do, so normalise the model's names to that.
        real = {n if n.startswith("text_model.") or n == "text_projection" else "text_model." + n: m
                for n, m in real.items()}
    missing, extra = sorted(set(real) - set(names)), sorted(set(names) - set(real))
    assert not missing and not extra, f"not in table: {missing[:10]}; not in model: {extra[:10]}"


# --- 3. the canonical side, by diffusers' own single-file converters -----------------------------------

def tagged_checkpoint(arch: str, *, conv_dims: bool):
    """An original checkpoint for the table's canonical names: weight of module #i (1-based) is [rows, 1] (or
    [rows, 1, 1, 1] for a conv when `conv_dims`) with row r = i * CODE + r; its bias (when the diffusers module
    has one) holds the same codes. Rows are the real full-size rows (sum of the diffusers parts)."""
    real = layers(denoiser(arch))
    sd, expect = {}, {}
    for i, m in enumerate(unet_modules(arch).values(), start=1):
        parts = [real[d] for d in m.diffusers]
        rows = sum(rows_cols(p)[0] for p in parts)
        assert rows < CODE
        codes = torch.arange(rows, dtype=torch.float64) + i * CODE
        conv = isinstance(parts[0], torch.nn.Conv2d) and conv_dims
        sd[m.canonical + ".weight"] = codes.reshape(rows, 1, 1, 1) if conv else codes.reshape(rows, 1)
        has_bias = {p.bias is not None for p in parts}
        assert len(has_bias) == 1, m.canonical
        if has_bias.pop():
            sd[m.canonical + ".bias"] = codes.clone()
        # what the table says each diffusers module receives
        unit = rows // (sum(m.split) if m.split else 1)
        if m.op == "swap_halves":
            codes = torch.cat([codes[rows // 2:], codes[: rows // 2]])
        for d, (a, b) in zip(m.diffusers, part_bounds(m, unit)):
            expect[d] = codes[a:b]
    return sd, expect


def check_converted(arch: str, converted: dict, expect: dict[str, torch.Tensor]):
    model_keys = set(denoiser(arch).state_dict())
    assert all(v is not None for v in converted.values()), [k for k, v in converted.items() if v is None][:5]
    off_model = sorted(set(converted) - model_keys)
    assert not off_model, f"converter produced keys the model does not have: {off_model[:10]}"
    for d, codes in expect.items():
        for suffix in (".weight", ".bias"):
            key = d + suffix
            if suffix == ".bias" and key not in model_keys:
                continue
            assert key in converted, f"{key}: not produced by the converter from the table's canonical name"
            got = converted[key].reshape(converted[key].shape[0], -1)[:, 0]
            if not torch.equal(got, codes):
                src = {int(c) // CODE for c in got.tolist()}
                mods = list(unet_modules(arch).values())
                raise AssertionError(
                    f"{key}: got rows of {[mods[s - 1].canonical for s in sorted(src) if 0 < s <= len(mods)]} "
                    f"(first codes {got[:3].tolist()}), table expects {codes[:3].tolist()}...")


def test_flux_canonical_names_by_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    sd, expect = tagged_checkpoint("flux1", conv_dims=False)
    # Non-LoRA keys the converter also pops: the qk-norm scales of every double and single block (all biases the
    # converter reads are added by tagged_checkpoint, from the model's Linear modules).
    modules = unet_modules("flux1")
    doubles = sorted({int(c.split(".")[1]) for c in modules if c.startswith("double_blocks.")})
    singles = sorted({int(c.split(".")[1]) for c in modules if c.startswith("single_blocks.")})
    assert doubles == list(range(19)) and singles == list(range(38))
    for i in doubles:
        for stream in ("img", "txt"):
            for norm in ("query_norm", "key_norm"):
                sd[f"double_blocks.{i}.{stream}_attn.norm.{norm}.scale"] = torch.ones(128, dtype=torch.float64)
    for i in singles:
        for norm in ("query_norm", "key_norm"):
            sd[f"single_blocks.{i}.norm.{norm}.scale"] = torch.ones(128, dtype=torch.float64)

    converted = convert_flux_transformer_checkpoint_to_diffusers(sd)
    assert not sd, f"converter left BFL keys unused: {sorted(sd)[:10]}"
    check_converted("flux1", converted, expect)
    # the table's canonical names plus the norm scales are a complete BFL checkpoint
    missing = sorted(set(denoiser("flux1").state_dict()) - set(converted))
    assert not missing, missing[:10]


def test_flux2_canonical_names_by_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    sd, expect = tagged_checkpoint("flux2", conv_dims=False)
    # Non-LoRA keys of a BFL checkpoint: the qk-norm scales of every double (both streams) and single block.
    head = FLUX2_COMMON["attention_head_dim"]
    for i in range(FLUX2["flux2_dev"]["num_layers"]):
        for stream in ("img", "txt"):
            for norm in ("query_norm", "key_norm"):
                sd[f"double_blocks.{i}.{stream}_attn.norm.{norm}.scale"] = torch.ones(head, dtype=torch.float64)
    for i in range(FLUX2["flux2_dev"]["num_single_layers"]):
        for norm in ("query_norm", "key_norm"):
            sd[f"single_blocks.{i}.norm.{norm}.scale"] = torch.ones(head, dtype=torch.float64)

    converted = convert_flux2_transformer_checkpoint_to_diffusers(sd)
    assert not sd, f"converter left BFL keys unused: {sorted(sd)[:10]}"
    check_converted("flux2", converted, expect)
    # the table's canonical names plus the norm scales are a complete BFL checkpoint, and nothing else came out
    model_keys = set(denoiser("flux2").state_dict())
    assert set(converted) == model_keys, sorted(set(converted) ^ model_keys)[:10]


@pytest.mark.parametrize("arch", ["sd3", "sd35_large"])
def test_sd3_canonical_names_by_diffusers_converter(arch):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    sd, expect = tagged_checkpoint(arch, conv_dims=True)
    sd["pos_embed"] = torch.zeros(1, 4, 8, dtype=torch.float64)  # not a LoRA target; the converter moves it
    converted = convert_sd3_transformer_checkpoint_to_diffusers(sd)
    assert not sd, f"converter left original keys unused: {sorted(sd)[:10]}"
    check_converted(arch, converted, expect)
    # the table's names are the whole checkpoint but the qk norms (diffusers reads them only when present)
    missing = sorted(set(denoiser(arch).state_dict()) - set(converted))
    assert all(".norm_" in k for k in missing), missing[:10]


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_ldm_canonical_names_by_diffusers_converter(arch):
    from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint

    # The converter maps names only (it never looks at shapes), so the full-size config is used as is: the
    # canonical names are exactly those of the published checkpoint.
    config = dict(denoiser(arch).config)
    sd, expect = tagged_checkpoint(arch, conv_dims=True)
    converted = convert_ldm_unet_checkpoint({LDM_UNET_KEY + k: v for k, v in sd.items()}, config)
    check_converted(arch, converted, expect)
    # nothing the table names is lost or lands twice
    produced = {k for k in converted if k.endswith(".weight")}
    assert produced == {d + ".weight" for d in expect}, sorted(produced ^ {d + ".weight" for d in expect})[:10]
    assert len(converted) == len(sd)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_ldm_block_children_are_contiguous(arch):
    """convert_ldm_unet_checkpoint accepts an upsampler at `output_blocks.N.1.conv` or `.N.2.conv` alike, so it cannot
    tell which index is right. The LDM/SGM UNet builds each input/output/middle block as a sequential of
    [ResBlock, SpatialTransformer (if the level has attention), Down/Upsample (if last of a level)], all with weights:
    the child indices of every block are 0..k-1 with no gap, and the blocks themselves are numbered with no gap."""
    children: dict[str, set[int]] = {}
    for canonical in unet_modules(arch):
        parts = canonical.split(".")
        if parts[0] in ("input_blocks", "output_blocks"):
            children.setdefault(f"{parts[0]}.{parts[1]}", set()).add(int(parts[2]))
        elif parts[0] == "middle_block":
            children.setdefault("middle_block", set()).add(int(parts[1]))
    for block, ks in children.items():
        assert ks == set(range(len(ks))), (block, sorted(ks))
    for kind in ("input_blocks", "output_blocks"):
        ns = sorted(int(b.split(".")[1]) for b in children if b.startswith(kind + "."))
        assert ns == list(range(len(ns))), (kind, ns)
    assert len(children["middle_block"]) == 3

    # each child is one diffusers container (a resnet, an attention or a sampler), never a mix, and vice versa;
    # in a block the resnet comes first, the attention next and the sampler last
    owner: dict[str, set[str]] = {}
    for canonical, m in unet_modules(arch).items():
        parts = canonical.split(".")
        if parts[0] in ("input_blocks", "output_blocks", "middle_block"):
            child = ".".join(parts[:2 if parts[0] == "middle_block" else 3])
            dparts = m.diffusers[0].split(".")
            owner.setdefault(child, set()).add(".".join(dparts[:3 if dparts[0] == "mid_block" else 4]))
    assert all(len(v) == 1 for v in owner.values()), {k: v for k, v in owner.items() if len(v) != 1}
    containers = [v.pop() for v in owner.values()]
    assert len(set(containers)) == len(containers)
    rank = {"resnets": 0, "attentions": 1, "downsamplers": 2, "upsamplers": 2}
    kinds: dict[str, dict[int, int]] = {}
    for child, container in zip(owner, containers):
        block, k = child.rsplit(".", 1)
        if block == "input_blocks.0":  # conv_in
            assert container == "conv_in" and k == "0"
            continue
        kinds.setdefault(block, {})[int(k)] = rank[container.split(".")[-2]]
    for block, by_k in kinds.items():
        order = [by_k[k] for k in sorted(by_k)]
        if block == "middle_block":
            assert order == [0, 1, 0], (block, order)
        else:
            assert order == sorted(order) and len(set(order)) == len(order), (block, order)


# --- 4. every spelling resolves ------------------------------------------------------------------------

def spellings(arch: str):
    for cname, comp in load_architecture(arch).components.items():
        for m in comp.table.modules.values():
            yield cname, comp.prefixes["kohya"] + m.canonical.replace(".", "_"), m, None
            yield cname, comp.prefixes["comfyui"] + m.canonical, m, None
            for part, d in enumerate(m.diffusers):
                p = part if m.split else None
                yield cname, comp.prefixes["diffusers"] + d, m, p
                yield cname, comp.prefixes["kohya"] + d.replace(".", "_"), m, p
            for alias in m.aliases:  # read-only spellings (xlabs), bare, on the whole weight
                yield cname, alias, m, None


@pytest.mark.parametrize("arch", ARCHS)
def test_every_spelling_parses_to_its_module(arch):
    a = load_architecture(arch)
    assert "unet" in a.components
    wrong, n = [], 0
    for cname, name, module, part in spellings(arch):
        n += 1
        p = parse_key(name + ".lora_down.weight", a)
        if p is None or p.component != cname or p.hit.module != module or p.hit.part != part or p.role != "down":
            wrong.append((name, None if p is None else (p.component, p.hit.module.canonical, p.hit.part)))
    assert not wrong, f"{len(wrong)} of {n} spellings misparsed: {wrong[:10]}"
