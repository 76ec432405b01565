"""key_maps/wan.toml (Wan 2.1 / 2.2) against diffusers' WanTransformer3DModel, its single-file converter and its LoRA
loader, and ComfyUI's own LoRA loader; dialect round trips; variant detection on full-size shapes (2.1 1.3B vs 2.2 5B
vs 14B); merges into Wan checkpoints.

Sizes are diffusers' scripts/convert_wan_to_diffusers.py `get_transformer_config` (the same numbers in Wan-AI's
wan/configs/*.py and DiffSynth-Studio's model_configs.py): hidden = heads x 128, ffn, blocks, latent channels in/out,
CLIP image cross-attention (I2V 2.1 only).
"""
from __future__ import annotations

import fnmatch
import functools

import numpy as np
import pytest
import torch

from lorabox.conversion import convert, lora_from_state_dict
from lorabox.detect import detect_architecture, lora_variant
from lorabox.keymap import fingerprint_width, load_architecture
from tests.helpers import WRITE, assert_same_deltas, lora_of_shapes, random_lora, to_torch
from tests.oracles import tiny_models
from tests.oracles.comfy import assert_comfy_loads_all, comfy_apply, comfy_load, requires_comfy
from tests.oracles.diffusers_oracle import DiffusersOracleError, base_weights, fused_weights

WAN = {  # variant -> WanTransformer3DModel config (attention_head_dim 128, text_dim 4096, freq_dim 256: the defaults)
    "wan21_t2v_1_3b": dict(num_attention_heads=12, ffn_dim=8960, num_layers=30, in_channels=16, out_channels=16),
    "wan21_t2v_14b": dict(num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=16, out_channels=16),
    "wan21_i2v_14b": dict(num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=36, out_channels=16,
                          image_dim=1280, added_kv_proj_dim=5120),
    "wan22_ti2v_5b": dict(num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48, out_channels=48),
    "wan22_t2v_a14b": dict(num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=16, out_channels=16),
    "wan22_i2v_a14b": dict(num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=36, out_channels=16),
}
# the widths a LoRA's shapes show: these variants are told apart by them, the 14B ones only by metadata
BY_SHAPES = {"wan21_t2v_1_3b": "wan21_t2v_1_3b", "wan22_ti2v_5b": "wan22_ti2v_5b", "wan21_i2v_14b": "wan21_i2v_14b"}
KINDS = (torch.nn.Linear, torch.nn.Conv3d)
CODE = 100_000


def table():
    return load_architecture("wan").unet.table


@functools.lru_cache(maxsize=None)
def full_model(variant: str) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        return WanTransformer3DModel(**WAN[variant])


def layers(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, KINDS)}


def rows_cols(m) -> tuple[int, ...]:
    return tuple(m.weight.shape) if isinstance(m, torch.nn.Conv3d) else (m.out_features, m.in_features)


@functools.lru_cache(maxsize=None)
def full_shapes(variant: str) -> dict[str, tuple[int, ...]]:
    """Canonical module -> weight shape in the full-size model (a variant's own modules)."""
    real = layers(full_model(variant))
    return {c: rows_cols(real[table().modules[c].diffusers[0]]) for c in table().variants[variant].modules}


# --- the table against the model at full size ----------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(WAN))
def test_variant_names_every_linear_and_conv_once(variant):
    v = table().variants[variant]
    names = [d for c in v.modules for d in table().modules[c].diffusers]
    assert len(names) == len(set(names))
    real = layers(full_model(variant))
    assert sorted(names) == sorted(real), sorted(set(names) ^ set(real))[:10]
    assert all(not m.split and m.op is None for m in table().modules.values())
    if variant == "wan21_i2v_14b":  # the whole table is the biggest variant
        assert v.modules == set(table().modules)


@pytest.mark.parametrize("variant", sorted(WAN))
def test_variant_dims_and_fingerprints_are_the_real_widths(variant):
    v = table().variants[variant]
    config = WAN[variant]
    assert v.dims["hidden"] == config["num_attention_heads"] * 128
    assert (v.dims["ffn"], v.dims["in_channels"], v.dims["out_channels"]) == (
        config["ffn_dim"], config["in_channels"], config["out_channels"])
    for name, shape in full_shapes(variant).items():
        for fp in table().fingerprints:
            if fnmatch.fnmatchcase(name, fp["module"]):
                got = shape[1] if fp["axis"] == "in" else shape[0]
                assert got == fingerprint_width(fp, v.dims), (name, fp)


def test_every_fingerprint_names_some_module():
    names = set(table().modules)
    dead = [fp for fp in table().fingerprints if not fnmatch.filter(names, fp["module"])]
    assert not dead, dead


def test_canonical_names_by_diffusers_single_file_converter():
    """An original Wan2.1 I2V checkpoint made of the table's canonical names (each weight's rows tagged): diffusers'
    convert_wan_transformer_to_diffusers puts every weight and bias into the diffusers module the table names."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    real = layers(full_model("wan21_i2v_14b"))
    sd, expect = {}, {}
    for i, m in enumerate(table().modules.values(), start=1):
        rows = rows_cols(real[m.diffusers[0]])[0]
        codes = torch.arange(rows, dtype=torch.float64) + i * CODE
        sd[f"model.diffusion_model.{m.canonical}.weight"] = codes.reshape(rows, 1)
        sd[f"model.diffusion_model.{m.canonical}.bias"] = codes.clone()
        expect[m.diffusers[0]] = codes
    converted = convert_wan_transformer_to_diffusers(sd)
    model_keys = set(full_model("wan21_i2v_14b").state_dict())
    assert set(converted) <= model_keys, sorted(set(converted) - model_keys)[:10]
    for d, codes in expect.items():
        for suffix in (".weight", ".bias"):
            assert torch.equal(converted[d + suffix].reshape(-1), codes), d + suffix


# --- dialects --------------------------------------------------------------------------------------------

def _through(lora, dialect):
    res = convert(lora, dialect)
    return lora_from_state_dict(res.tensors, res.metadata, arch="wan")


def test_every_spelling_parses_to_its_module():
    """kohya flattened (original and diffusers names), ComfyUI dotted, diffusers: each names its module."""
    from lorabox.dialects import parse_key
    from tests.test_keymaps_vs_diffusers import spellings

    arch = load_architecture("wan")
    wrong = []
    for cname, name, module, part in spellings("wan"):
        p = parse_key(name + ".lora_down.weight", arch)
        if p is None or (p.component, p.hit.module, p.hit.part, p.role) != (cname, module, part, "down"):
            wrong.append(name)
    assert not wrong, wrong[:10]


@pytest.mark.parametrize("src", WRITE)
@pytest.mark.parametrize("dst", WRITE)
def test_every_dialect_to_every_dialect_is_delta_exact(src, dst):
    lora = random_lora("wan", every=5, alpha=3.0)
    a = _through(lora, src)
    b = _through(a, dst)
    assert (a.architecture, b.architecture) == ("wan", "wan")
    assert_same_deltas(lora, a)
    assert_same_deltas(lora, b)


@pytest.mark.parametrize("via", ["diffusers", "bfl"])
def test_kohya_through_folding_dialect_and_back_is_bit_exact(via):
    lora = random_lora("wan", every=3, alpha=3.0)
    kohya = _through(lora, "kohya")
    back = _through(_through(kohya, via), "kohya")
    assert back.adapters.keys() == lora.adapters.keys()
    for key, a in lora.adapters.items():
        b = back.adapters[key]
        assert all(a.tensors[r].bits_equal(b.tensors[r]) for r in a.tensors), key
        assert a.alpha.bits_equal(b.alpha), key


def test_written_spellings_are_the_ones_trainers_use():
    lora = lora_of_shapes("wan", {"blocks.3.self_attn.q": (16, 16), "head.head": (64, 16)})
    assert set(convert(lora, "kohya").tensors) >= {"lora_unet_blocks_3_self_attn_q.lora_down.weight",
                                                    "lora_unet_head_head.alpha"}
    assert "diffusion_model.blocks.3.self_attn.q.lora_up.weight" in convert(lora, "comfyui").tensors
    assert "transformer.blocks.3.attn1.to_q.lora_A.weight" in convert(lora, "diffusers").tensors


# --- detection on full-size shapes ---------------------------------------------------------------------

def _shapes_only(lora, dialect):
    res = convert(lora, dialect)
    return res.tensors, {k: v for k, v in res.metadata.items() if not k.startswith(("modelspec.", "ss_"))}


@pytest.mark.parametrize("variant", sorted(WAN))
@pytest.mark.parametrize("dialect", ["kohya", "comfyui", "diffusers"])
def test_architecture_and_variant_from_full_size_shapes(variant, dialect):
    """Rank-1 LoRAs on every 7th module (patch_embedding included) of each size: the architecture is always Wan; the
    variant is named when the widths tell it (1.3B, 5B, 2.1 I2V with its image modules), else None (the 14B sizes
    share every width)."""
    shapes = dict(full_shapes(variant))
    lora = lora_of_shapes("wan", shapes, every=7, seed=3)
    if variant == "wan21_i2v_14b":  # its own modules (k_img, img_emb) are what tell it
        lora = lora_of_shapes("wan", {k: v for k, v in shapes.items() if "img" in k}, every=5, seed=3)
    tensors, metadata = _shapes_only(lora, dialect)
    assert detect_architecture(tensors, metadata) == "wan"
    assert lora_variant(tensors, metadata, "wan") == BY_SHAPES.get(variant)


def test_blocks_only_loras_tell_1_3b_from_5b_from_14b():
    """What a musubi-tuner LoRA holds (attention and ffn of the blocks): hidden 1536 / 3072 / 5120 decide."""
    seen = {}
    for variant in ("wan21_t2v_1_3b", "wan22_ti2v_5b", "wan21_t2v_14b"):
        blocks = {k: v for k, v in full_shapes(variant).items() if k.startswith("blocks.0.")}
        tensors, _ = _shapes_only(lora_of_shapes("wan", blocks, seed=1), "kohya")
        seen[variant] = lora_variant(tensors, {}, "wan")
    assert seen == {"wan21_t2v_1_3b": "wan21_t2v_1_3b", "wan22_ti2v_5b": "wan22_ti2v_5b", "wan21_t2v_14b": None}


def test_14b_sizes_come_from_metadata_never_against_shapes():
    blocks = {k: v for k, v in full_shapes("wan22_t2v_a14b").items() if k.startswith("blocks.1.")}
    tensors, _ = _shapes_only(lora_of_shapes("wan", blocks, seed=2), "comfyui")
    assert lora_variant(tensors, {}, "wan") is None
    assert lora_variant(tensors, {"modelspec.architecture": "wan-2.2-t2v-a14b"}, "wan") == "wan22_t2v_a14b"
    assert lora_variant(tensors, {"modelspec.architecture": "wan-2.1-t2v-14b/lora"}, "wan") == "wan21_t2v_14b"
    # musubi-tuner's `wan2.1` names no size (it writes it for Wan2.2 too); a 5B id does not fit 5120-wide shapes
    assert lora_variant(tensors, {"modelspec.architecture": "wan2.1/lora"}, "wan") is None
    assert lora_variant(tensors, {"modelspec.architecture": "wan-2.2-ti2v-5b"}, "wan") is None


def test_written_modelspec_is_read_back_as_the_variant():
    """lorabox writes its modelspec id; a 1.3B file read back names its size from shapes and metadata alike."""
    lora = lora_of_shapes("wan", full_shapes("wan21_t2v_1_3b"), every=13, seed=4)
    res = convert(lora, "kohya")
    assert lora_variant(res.tensors, res.metadata, "wan") == "wan21_t2v_1_3b"


# --- diffusers' own loader on a tiny WanTransformer3DModel ---------------------------------------------

@functools.lru_cache(maxsize=None)
def tiny_shapes() -> dict[str, tuple[int, ...]]:
    real = layers(tiny_models.tiny_wan())
    out = {c: tuple(real[m.diffusers[0]].weight.shape) for c, m in table().modules.items()
           if m.diffusers[0] in real}
    assert {table().modules[c].diffusers[0] for c in out} == set(real)
    return out


def tiny_lora(*, blocks_only=False, alpha=3.0):
    shapes = {k: v for k, v in tiny_shapes().items() if k.startswith("blocks.") or not blocks_only}
    return lora_of_shapes("wan", shapes, rank=2, alpha=alpha, dtype="F32", seed=11)


def write(lora, dialect, path):
    import safetensors.torch

    res = convert(lora, dialect)
    safetensors.torch.save_file(to_torch(res.tensors), path, metadata=res.metadata)
    return path


def assert_fused_like_lorabox(lora, path):
    from tests.helpers import effective_deltas

    fused, base = fused_weights("wan", path), base_weights("wan")
    want = {f"transformer.{table().modules[n].diffusers[0]}.weight": d for (_, n), d in effective_deltas(lora).items()}
    changed = {k for k in fused if not torch.equal(fused[k], base[k])}
    assert changed == set(want), sorted(changed ^ set(want))[:10]
    for key, delta in want.items():
        got = (fused[key].double() - base[key].double()).numpy().reshape(delta.shape[0], -1)
        delta = delta.reshape(delta.shape[0], -1)
        assert np.abs(got - delta).max() <= 1e-5 * max(1.0, np.abs(delta).max()), key


def test_diffusers_fuses_every_module_of_the_diffusers_dialect(tmp_path):
    """Every Linear and the Conv3d patch_embedding, alpha 3 / rank 2 folded in float32: no unused key, and fused -
    base is lorabox's delta."""
    lora = tiny_lora()
    assert_fused_like_lorabox(lora, write(lora, "diffusers", tmp_path / "d.safetensors"))


@pytest.mark.parametrize("dialect", ["kohya", "comfyui"])
def test_diffusers_fuses_block_loras_of_the_trainer_dialects(tmp_path, dialect):
    """musubi-tuner (`lora_unet_blocks_0_self_attn_q`, alpha tensors) and ComfyUI (`diffusion_model.blocks.0...`)
    spellings of a LoRA on every block module, read by diffusers' Wan converters."""
    lora = tiny_lora(blocks_only=True)
    assert_fused_like_lorabox(lora, write(lora, dialect, tmp_path / f"{dialect}.safetensors"))


@pytest.mark.parametrize("dialect", ["kohya", "comfyui"])
def test_diffusers_refuses_top_level_modules_in_the_trainer_dialects(tmp_path, dialect):
    """KNOWN_DIFFUSERS_BUGS['wan_trainer_dialects_blocks_only'], pinned: diffusers 0.42.1's musubi converter reads
    block modules only (a top-level `lora_unet_head_head` makes it fail on `split("blocks_")`), and its ComfyUI-spelling
    converter neither reads patch_embedding nor pops the `.alpha` of the embedders and head. lorabox's diffusers
    dialect carries them (test above)."""
    lora = tiny_lora()
    with pytest.raises(DiffusersOracleError, match="should be empty|IndexError"):
        fused_weights("wan", write(lora, dialect, tmp_path / f"{dialect}.safetensors"))


def test_diffusers_musubi_reader_needs_every_module_of_blocks_0_to_n(tmp_path):
    """KNOWN_DIFFUSERS_BUGS['wan_trainer_dialects_blocks_only'], pinned: the musubi reader counts the block indices and
    pops q/k/v/o/ffn of blocks 0..count-1, so a kohya-spelled LoRA on block 1 alone (or on attention only) is refused;
    lorabox reads and writes it (ComfyUI loads it by name)."""
    lora = lora_of_shapes("wan", {k: v for k, v in tiny_shapes().items() if k.startswith("blocks.1.")}, rank=2)
    path = write(lora, "kohya", tmp_path / "block1.safetensors")
    assert lora_from_state_dict(*_read(path), arch="wan").adapters.keys() == lora.adapters.keys()
    with pytest.raises(DiffusersOracleError, match="KeyError"):
        fused_weights("wan", path)


def _read(path):
    from lorabox.io.safetensors import read_tensors

    return read_tensors(path)


# --- merge into a Wan checkpoint (the table's [layouts]) -----------------------------------------------

@pytest.mark.parametrize("layout,prefix", [("original", ""), ("comfyui", "model.diffusion_model.")])
def test_merge_into_original_and_comfyui_checkpoints(tmp_path, layout, prefix):
    """A float32 checkpoint with the tiny model's shapes under the original names (Conv3d patch_embedding included):
    every weight the LoRA targets becomes base + delta (float64, rounded once to float32), the rest is untouched."""
    from lorabox.io.safetensors import read_tensors, write_tensors
    from lorabox.merge.engine import merge
    from lorabox.tensor import Tensor
    from tests.helpers import effective_deltas

    rng = np.random.default_rng(5)
    base = {f"{prefix}{c}.weight": Tensor.from_values(rng.standard_normal(s), "F32") for c, s in tiny_shapes().items()}
    base[f"{prefix}head.modulation"] = Tensor.from_values(rng.standard_normal((1, 2, 16)), "F32")
    write_tensors(tmp_path / "base.safetensors", base, {})
    lora = tiny_lora()
    path = tmp_path / "lora.safetensors"
    res = convert(lora, "kohya")
    write_tensors(path, res.tensors, res.metadata)
    report = merge(tmp_path / "base.safetensors", [(path, 0.75)], tmp_path / "out.safetensors", dtype="keep")
    assert (report.architecture, report.layout) == ("wan", layout)
    out, _ = read_tensors(tmp_path / "out.safetensors")
    deltas = {f"{prefix}{n}.weight": d for (_, n), d in effective_deltas(lora).items()}
    assert set(deltas) == {k for k in base if k.endswith(".weight")}
    for key, t in base.items():
        want = t.values().astype(np.float64)
        if key in deltas:
            want = want + 0.75 * deltas[key].reshape(want.shape)
        assert np.array_equal(out[key].values(), want.astype(np.float32)), key


# --- ComfyUI's own loader (tests/oracles/comfy.py: ComfyUI 0.3.75 builds Wan2.1 I2V 14B on `meta`) ----------

@requires_comfy
@pytest.mark.parametrize("dialect", ["kohya", "comfyui"])
def test_comfy_consumes_every_key(dialect):
    lora = random_lora("wan", every=1, rank=2)  # every module of the table
    assert_comfy_loads_all("wan", to_torch(convert(lora, dialect).tensors))


@requires_comfy
@pytest.mark.parametrize("dialect", ["kohya", "comfyui"])
def test_comfy_applies_lorabox_delta(dialect):
    """ComfyUI's calculate_weight on lorabox's output (alpha 3 / rank 2, from a diffusers-dialect source) is W +
    strength x lorabox's delta, the Conv3d patch embedding included."""
    from tests.helpers import effective_deltas
    src = tiny_lora()
    res = convert(_through(src, "diffusers"), dialect)
    deltas = effective_deltas(src)
    rng = np.random.default_rng(1)
    for module in ("patch_embedding", "blocks.1.cross_attn.k_img", "head.head", "img_emb.proj.1", "blocks.0.ffn.2"):
        shape = tiny_shapes()[module]
        w = rng.standard_normal(shape)
        got = comfy_apply("wan", to_torch(res.tensors), f"diffusion_model.{module}.weight", torch.from_numpy(w).float(),
                          strength=0.8)
        want = w + 0.8 * deltas[("unet", module)].reshape(shape)
        assert np.abs(got.double().numpy() - want).max() <= 1e-5 * max(1.0, np.abs(want).max()), module


@requires_comfy
def test_comfy_does_not_read_the_diffusers_spelling():
    """ComfyUI 0.3.75 maps Wan LoRAs by original names only (kohya `lora_unet_` and `diffusion_model.`); a
    `transformer.blocks.0.attn1.to_q` file loads nothing: `--to comfyui` or `--to kohya` is the file ComfyUI reads."""
    sd = to_torch(convert(random_lora("wan", every=9, rank=2), "diffusers").tensors)
    assert comfy_load("wan", sd).unloaded_keys == sorted(sd)


# --- `lorabox check`'s runtime coverage for Wan, against the real loaders -----------------------------------

@pytest.mark.parametrize("dialect,refused", [("diffusers", False), ("kohya", True), ("comfyui", True)])
def test_check_diffusers_coverage_matches_load_lora_weights(tmp_path, dialect, refused):
    """The diffusers rules of lorabox/check/runtimes.py for Wan against diffusers' load_lora_weights on the tiny model:
    the diffusers dialect loads every key; kohya and ComfyUI files with top-level modules are refused whole."""
    from lorabox.check import check_file
    from tests.oracles.diffusers_coverage import diffusers_coverage

    path = write(tiny_lora(), dialect, tmp_path / f"{dialect}.safetensors")
    truth = diffusers_coverage("wan", path)
    assert bool(truth.refused) == refused
    named = {f.id: f.keys for f in check_file(path).findings if f.id.startswith("coverage.diffusers")}
    if refused:
        assert named == {"coverage.diffusers_refuses": truth.dropped}
    else:
        assert named == {} and truth.dropped == []
