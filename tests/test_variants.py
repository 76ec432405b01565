"""Architecture and variant detection on LoRAs with the real full-size shapes (built from diffusers' models on `meta`,
random rank-1 factors): FLUX.1 vs FLUX.2, whose BFL names overlap, and FLUX.2 dev vs Klein 9B vs Klein 4B; and the
variant of a base checkpoint, from its weights' shapes."""
from __future__ import annotations

import functools

import pytest

from lorabox.conversion import convert
from lorabox.detect import detect_architecture, lora_variant
from lorabox.errors import UnknownArchitecture
from lorabox.keymap import load_architecture
from lorabox.merge.base import open_base
from lorabox.merge.plan import base_variant
from tests.helpers import WRITE, lora_of_shapes
from tests.test_keymaps_vs_diffusers import FLUX2, denoiser, layers, rows_cols

# (model, architecture, the variant its shapes alone tell): SD3 Medium has the modules of SD3.5 Medium minus attn2,
# so a LoRA of it fits both sizes (see test_sd3_medium_needs_metadata)
MODELS = ([("flux1", "flux1", None)] + [(v, "flux2", v) for v in sorted(FLUX2)]
          + [("sd3_medium", "sd3", None), ("sd35_medium", "sd3", "sd35_medium"), ("sd35_large", "sd35_large", None)])


@functools.lru_cache(maxsize=None)
def full_shapes(model: str, arch: str) -> dict[str, tuple[int, int]]:
    """Canonical module -> (rows, cols) of the whole weight in the full-size model (modules it has)."""
    real = layers(denoiser(model))
    out = {}
    for name, m in load_architecture(arch).unet.table.modules.items():
        if all(d in real for d in m.diffusers):
            out[name] = (sum(rows_cols(real[d])[0] for d in m.diffusers), rows_cols(real[m.diffusers[0]])[1])
    return out


def spelled(lora, dialect):
    res = convert(lora, dialect)
    return res.tensors, res.metadata


@pytest.mark.parametrize("model,arch,variant", MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("dialect", WRITE)
def test_architecture_and_variant_from_full_size_shapes(model, arch, variant, dialect):
    lora = lora_of_shapes(arch, full_shapes(model, arch), every=3, seed=len(model))
    tensors, metadata = spelled(lora, dialect)
    metadata = {k: v for k, v in metadata.items() if not k.startswith(("modelspec.", "ss_"))}  # shapes only
    assert detect_architecture(tensors, metadata) == arch
    assert lora_variant(tensors, metadata, arch) == variant


def _only(shapes: dict, keep) -> dict:
    return {k: v for k, v in shapes.items() if keep(k)}


def test_attention_only_klein_4b_lora_needs_the_metadata_to_tell_it_from_flux1():
    """Klein 4B has FLUX.1's hidden size (3072) and the same attention names: a LoRA on the double blocks' attention
    alone fits both. Detection refuses to guess; the file's own metadata (ai-toolkit writes the arch) decides."""
    attention = _only(full_shapes("flux2_klein_4b", "flux2"), lambda k: "_attn." in k)
    tensors, _ = spelled(lora_of_shapes("flux2", attention), "comfyui")
    with pytest.raises(UnknownArchitecture, match="flux1 or flux2|flux2 or flux1"):
        detect_architecture(tensors, {})
    hinted = {"ss_base_model_version": "flux2_klein_4b"}
    assert detect_architecture(tensors, hinted) == "flux2"
    assert lora_variant(tensors, {}, "flux2") == "flux2_klein_4b"  # the widths tell the FLUX.2 sizes apart


def test_mlp_shapes_tell_klein_4b_from_flux1():
    """The same names and hidden size, but SwiGLU (6h) vs GELU (4h) MLP rows: no metadata needed."""
    mlp = _only(full_shapes("flux2_klein_4b", "flux2"), lambda k: "_mlp." in k)
    tensors, _ = spelled(lora_of_shapes("flux2", mlp), "kohya")
    assert detect_architecture(tensors, {}) == "flux2"
    mlp1 = _only(full_shapes("flux1", "flux1"), lambda k: "_mlp." in k and int(k.split(".")[1]) < 5)
    tensors, _ = spelled(lora_of_shapes("flux1", mlp1), "kohya")
    assert detect_architecture(tensors, {}) == "flux1"


def test_variant_without_telling_shapes_comes_from_metadata():
    """time_in.out_layer is [hidden, hidden] with no fingerprint and exists in every size: only metadata can tell,
    and metadata never overrides shapes that disagree with it."""
    one = _only(full_shapes("flux2_klein_9b", "flux2"), lambda k: k == "time_in.out_layer")
    tensors, _ = spelled(lora_of_shapes("flux2", one), "comfyui")
    assert lora_variant(tensors, {}, "flux2") is None
    assert lora_variant(tensors, {"modelspec.architecture": "flux-2-klein-9b"}, "flux2") == "flux2_klein_9b"
    assert lora_variant(tensors, {"ss_base_model_version": "flux2"}, "flux2") == "flux2_dev"

    mlp = _only(full_shapes("flux2_klein_4b", "flux2"), lambda k: k == "double_blocks.0.img_mlp.0")
    tensors, _ = spelled(lora_of_shapes("flux2", mlp), "comfyui")
    assert lora_variant(tensors, {"ss_base_model_version": "flux2_klein_9b"}, "flux2") == "flux2_klein_4b"


def test_block_indices_rule_out_smaller_variants():
    """A single block past Klein 4B's 20 (and 9B's 24) is dev's, whatever else the LoRA holds."""
    dev = full_shapes("flux2_dev", "flux2")
    tensors, _ = spelled(lora_of_shapes("flux2", _only(dev, lambda k: k == "single_blocks.30.linear2")), "kohya")
    assert lora_variant(tensors, {}, "flux2") == "flux2_dev"


def test_architectures_without_variants_have_none():
    lora = lora_of_shapes("flux1", full_shapes("flux1", "flux1"), every=11)
    tensors, metadata = spelled(lora, "kohya")
    assert lora_variant(tensors, metadata, "flux1") is None


@pytest.mark.parametrize("variant", sorted(FLUX2))
@pytest.mark.parametrize("layout", ["bfl", "comfyui"])
def test_base_variant_from_weight_shapes(tmp_path, variant, layout):
    """A base checkpoint's variant from its weights' shapes (img_in and final_layer.linear keep the file small)."""
    import torch
    from safetensors.torch import save_file

    shapes = full_shapes(variant, "flux2")
    prefix = {"bfl": "", "comfyui": "model.diffusion_model."}[layout]
    sd = {f"{prefix}{m}.weight": torch.zeros(shapes[m], dtype=torch.bfloat16) for m in ("img_in", "final_layer.linear")}
    save_file(sd, tmp_path / "base.safetensors")
    assert base_variant(open_base(tmp_path / "base.safetensors"), "flux2") == variant
    assert base_variant(open_base(tmp_path / "base.safetensors"), "flux1") is None


def test_sd3_medium_needs_metadata():
    """SD3 Medium and SD3.5 Medium share widths and names but for 3.5's attn2: a LoRA without attn2 fits both; kohya's
    modelspec.architecture names the size."""
    lora = lora_of_shapes("sd3", full_shapes("sd3_medium", "sd3"), every=2)
    tensors, _ = spelled(lora, "kohya")
    assert detect_architecture(tensors, {}) == "sd3"
    assert lora_variant(tensors, {}, "sd3") is None
    meta = {"modelspec.architecture": "stable-diffusion-v3-medium/lora"}
    assert lora_variant(tensors, meta, "sd3") == "sd3_medium"


def test_sd35_large_and_medium_share_names_but_not_widths():
    """Blocks 0-22 have the same names in both tables: the hidden size (1536 vs 2432) decides."""
    large = _only(full_shapes("sd35_large", "sd35_large"), lambda k: k.startswith("joint_blocks.") and
                  int(k.split(".")[1]) < 23)
    tensors, _ = spelled(lora_of_shapes("sd35_large", large, every=5), "comfyui")
    assert detect_architecture(tensors, {}) == "sd35_large"
    medium = _only(full_shapes("sd3_medium", "sd3"), lambda k: k in large)
    tensors, _ = spelled(lora_of_shapes("sd3", medium, every=5), "comfyui")
    assert detect_architecture(tensors, {}) == "sd3"


def test_inspect_names_the_variant_and_arch_settles_a_tie(tmp_path):
    from click.testing import CliRunner

    from lorabox.cli import main
    from lorabox.io.safetensors import write_tensors
    from lorabox.summary import inspect_file

    attention = _only(full_shapes("flux2_klein_4b", "flux2"), lambda k: "_attn." in k)
    path = tmp_path / "klein_attention.safetensors"
    write_tensors(path, *spelled(lora_of_shapes("flux2", attention, every=3), "kohya"))
    tied = CliRunner().invoke(main, ["inspect", str(path)])
    assert tied.exit_code != 0 and "--arch" in tied.output
    settled = CliRunner().invoke(main, ["inspect", "--arch", "flux2", str(path)])
    assert settled.exit_code == 0, settled.output
    assert "variant       flux2_klein_4b: FLUX.2 [klein] 4B" in settled.output
    info = inspect_file(path, arch="flux2")
    assert (info["variant"], info["size"]) == ("flux2_klein_4b", "published")


@pytest.mark.parametrize("model,arch,variant", MODELS, ids=[m[0] for m in MODELS])
def test_base_architecture_from_its_weight_names(tmp_path, model, arch, variant):
    """Every weight of a published model, under its original names (tiny shapes: only names count here): the base
    is taken for the right table, though FLUX.2 Klein shares most names with FLUX.1 and SD3.5 Large with SD3."""
    import torch
    from safetensors.torch import save_file

    from lorabox.merge.plan import detect_base

    table = load_architecture(arch).unet.table
    names = table.variants[variant].modules if variant else set(full_shapes(model, arch))
    save_file({f"{m}.weight": torch.zeros(2, 2) for m in names}, tmp_path / "base.safetensors")
    assert detect_base(open_base(tmp_path / "base.safetensors"))[:2] == (arch, "bfl" if "flux" in arch else "bare")
