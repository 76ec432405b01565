"""diffusers' own LoRA loader (load_lora_weights + fuse_lora on a tiny model built from its class) on lorabox's outputs
for the MMDiT tables: every key used (the oracle raises on any unused one), and fused - base equals lorabox's effective
delta, put into diffusers' layout by the table (row slices, swap_halves), to 1e-5.

Spellings diffusers 0.42.1 cannot read are pinned below (KNOWN_DIFFUSERS_BUGS in the oracle): if one starts to pass,
move it into the main test."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from lorabox.conversion import convert
from lorabox.keymap import load_architecture
from lorabox.lora import Lora
from lorabox.ops import ROW_OPS
from tests.helpers import effective_deltas, lora_of_shapes, to_torch
from tests.oracles import tiny_models
from tests.oracles.diffusers_oracle import DiffusersOracleError, base_weights, fused_weights

TINY = {"flux2": tiny_models.tiny_flux2, "sd3": tiny_models.tiny_sd3}
# modules diffusers' kohya reader for the architecture has no entry for (KNOWN_DIFFUSERS_BUGS)
KOHYA_UNREAD = {"flux2": ("guidance_in.", "double_stream_modulation_", "single_stream_modulation.",
                          "final_layer.adaLN_modulation.1")}


@functools.lru_cache(maxsize=None)
def tiny_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Canonical module -> shape of the whole weight in the tiny diffusers model (the table names every layer of it)."""
    real = {n: m for n, m in TINY[arch]().named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    table = load_architecture(arch).unet.table
    out = {}
    for name, m in table.modules.items():
        if all(d in real for d in m.diffusers):
            out[name] = (sum(real[d].weight.shape[0] for d in m.diffusers), *real[m.diffusers[0]].weight.shape[1:])
    assert {d for n in out for d in table.modules[n].diffusers} == set(real)
    return out


def diffusers_deltas(lora) -> dict[str, np.ndarray]:
    """lorabox's effective deltas in diffusers' layout: `transformer.<name>.weight` -> float64 delta."""
    table = load_architecture(lora.architecture).unet.table
    out = {}
    for (comp, name), delta in effective_deltas(lora).items():
        m = table.modules[name]
        if m.op:
            delta = delta[ROW_OPS[m.op][0](delta.shape[0])]
        unit = delta.shape[0] // (sum(m.split) if m.split else 1)
        at = 0
        for d, share in zip(m.diffusers, m.split or (1,)):
            out[f"transformer.{d}.weight"] = delta[at:at + unit * share]
            at += unit * share
    return out


def lora_for(arch: str, *, skip=(), alpha=3.0):
    shapes = {k: v for k, v in tiny_shapes(arch).items() if not k.startswith(skip)}
    return lora_of_shapes(arch, shapes, rank=2, alpha=alpha, dtype="F32", seed=7)


def assert_fused_like_lorabox(arch, lora, path):
    fused, base = fused_weights(arch, path), base_weights(arch)
    want = diffusers_deltas(lora)
    changed = {k for k in fused if not torch.equal(fused[k], base[k])}
    assert changed == set(want), sorted(changed ^ set(want))[:10]
    for key, delta in want.items():
        got = (fused[key].double() - base[key].double()).numpy()
        scale = max(1.0, np.abs(delta).max())
        assert np.abs(got - delta).max() <= 1e-5 * scale, key


def write(lora, dialect, path):
    import safetensors.torch

    res = convert(lora, dialect)
    safetensors.torch.save_file(to_torch(res.tensors), path, metadata=res.metadata)
    return path


CASES = [("flux2", "diffusers"), ("flux2", "kohya"), ("sd3", "diffusers")]


@pytest.mark.parametrize("arch,dialect", CASES, ids=[f"{a}-{d}" for a, d in CASES])
def test_diffusers_fuses_lorabox_output_as_lorabox_says(tmp_path, arch, dialect):
    """alpha 3 / rank 2: not a power of two, so the diffusers dialect folds it in float32 and kohya keeps `.alpha`."""
    lora = lora_for(arch, skip=KOHYA_UNREAD[arch] if dialect == "kohya" else ())
    assert_fused_like_lorabox(arch, lora, write(lora, dialect, tmp_path / f"{dialect}.safetensors"))


def test_flux2_kohya_modulation_and_final_adaln_are_dropped_by_diffusers(tmp_path):
    """KNOWN_DIFFUSERS_BUGS['flux2_kohya_drops_modulation'], pinned: if diffusers reads them, empty KOHYA_UNREAD."""
    lora = lora_for("flux2", skip=("double_blocks.", "single_blocks."))
    with pytest.raises(DiffusersOracleError, match="Unsupported keys"):
        fused_weights("flux2", write(lora, "kohya", tmp_path / "k.safetensors"))


def test_flux2_comfyui_spelling_is_unread_by_diffusers(tmp_path):
    """KNOWN_DIFFUSERS_BUGS['flux2_comfyui_spelling_unread'], pinned (ComfyUI itself loads these: test_comfy_peer)."""
    lora = lora_for("flux2")
    with pytest.raises(DiffusersOracleError):
        fused_weights("flux2", write(lora, "comfyui", tmp_path / "c.safetensors"))


def test_flux2_ai_toolkit_spelling_is_read_by_lorabox_and_diffusers_misses_only_the_final_swap(tmp_path):
    """ai-toolkit writes `diffusion_model.` + BFL names + lora_A/lora_B, no alpha. lorabox reads it; diffusers fuses
    every weight as lorabox says except norm_out.linear, whose halves it does not swap
    (KNOWN_DIFFUSERS_BUGS['flux2_ai_toolkit_final_layer_not_swapped'])."""
    import safetensors.torch

    from lorabox.conversion import load_lora

    lora = lora_for("flux2", alpha=2.0)  # alpha == rank: ai-toolkit files carry no alpha
    bare = convert(lora, "bfl").tensors
    path = tmp_path / "ai_toolkit.safetensors"
    safetensors.torch.save_file({f"diffusion_model.{k}": v for k, v in to_torch(bare).items()}, path)
    read = load_lora(path)
    assert read.architecture == "flux2"
    want = diffusers_deltas(read)
    assert want.keys() == diffusers_deltas(lora).keys()
    fused, base = fused_weights("flux2", path), base_weights("flux2")
    wrong = []
    for key, delta in want.items():
        got = (fused[key].double() - base[key].double()).numpy()
        if np.abs(got - delta).max() > 1e-5 * max(1.0, np.abs(delta).max()):
            wrong.append(key)
            swapped = delta[ROW_OPS["swap_halves"][0](delta.shape[0])]
            assert np.abs(got - swapped).max() <= 1e-5 * max(1.0, np.abs(delta).max()), key
    assert wrong == ["transformer.norm_out.linear.weight"]


@pytest.mark.parametrize("dialect", ["kohya", "comfyui"])
def test_sd3_reads_only_the_peft_spelling(tmp_path, dialect):
    """KNOWN_DIFFUSERS_BUGS['sd3_only_peft_spelling'], pinned: diffusers 0.42.1 has no SD3 converter at all."""
    lora = lora_for("sd3")
    with pytest.raises(DiffusersOracleError, match="silently dropped|No LoRA keys|Invalid LoRA checkpoint"):
        fused_weights("sd3", write(lora, dialect, tmp_path / f"{dialect}.safetensors"))


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.mark.parametrize("arch", ["flux2", "sd3"])
def test_real_peft_files_read_as_diffusers_applies_them(tmp_path, arch):
    """fixtures/<arch>_peft.safetensors (peft + save_lora_weights, lora_alpha 8 != r 4 in lora_adapter_metadata):
    lorabox's reading of it is what diffusers fuses, and so is lorabox's diffusers-dialect rewrite of it."""
    from lorabox.conversion import load_lora

    src = FIXTURES / f"{arch}_peft.safetensors"
    lora = load_lora(src)
    assert lora.architecture == arch
    unet_only = Lora(arch)
    for a in lora.adapters.values():
        if a.component == "unet":
            unet_only.add(a)
    ref = fused_weights(arch, src)
    want = diffusers_deltas(unet_only)
    base = base_weights(arch)
    for key, delta in want.items():
        got = (ref[key].double() - base[key].double()).numpy()
        assert np.abs(got - delta).max() <= 1e-5 * max(1.0, np.abs(delta).max()), key
    out = write(lora, "diffusers", tmp_path / "rewritten.safetensors")
    again = fused_weights(arch, out)
    for key in ref:
        assert (again[key] - ref[key]).abs().max() <= 1e-5 * max(1.0, ref[key].abs().max().item()), key
