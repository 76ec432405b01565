#!/usr/bin/env python
"""Write the small LoRA fixtures in fixtures/ from the real libraries' code paths, deterministically.

    .venv/bin/python scripts/make_fixtures.py [NAME ...]     (names such as flux2_peft: only those files)

Every file is for the tiny models of tests/oracles/tiny_models.py (the wide Flux file for wide_flux_single()) and is
checked by loading it through diffusers (tests/oracles/diffusers_oracle.fused_weights) before the summary line.

* ``<arch>_peft.safetensors`` (sd15, sdxl, flux1, flux2, sd3): peft ``LoraConfig(r=4, lora_alpha=8)`` adapters added with
  ``add_adapter`` to the tiny denoiser and text encoder(s), lora_B randomised, saved with the pipeline's
  ``save_lora_weights(..., <component>_lora_layers=get_peft_model_state_dict(model),
  <component>_lora_adapter_metadata=...)`` (metadata from diffusers.training_utils._collate_lora_metadata, as the
  training scripts do), so the header carries ``lora_adapter_metadata``.
* ``<arch>_kohya_diffusers_names.safetensors`` (sd15, sdxl): the PEFT file above through
  ``convert_all_state_dict_to_peft`` + ``convert_state_dict_to_kohya`` and ``safetensors.torch.save_file``, as
  diffusers' ``--output_kohya_format`` does (ai-toolkit writes the same naming).
* ``sdxl_kohya_sgm.safetensors``: sd-scripts naming on SGM module names (``lora_unet_input_blocks_4_1_...``), fp16,
  rank 4, alpha 2.0; names and shapes from ``diffusers_oracle.sdxl_sgm_layout`` (diffusers' own LDM/SGM converter).
* ``flux1_kohya_bfl.safetensors``: sd-scripts naming on BFL module names (``lora_unet_double_blocks_0_img_attn_qkv``),
  bf16, rank 4, alpha 2.0; names and shapes from ``diffusers_oracle.flux_bfl_layout`` (diffusers' own BFL converter).
  diffusers 0.42.1 drops its top-level modules (img_in, ..., final_layer) silently: load it with
  ``fused_weights(..., repair_flux_kohya_toplevel=True)``.
* ``flux1_kohya_bfl_linear1_wide.safetensors``: ``single_blocks_0_linear1`` / ``linear2`` at Flux.1's width 3072,
  rank 1, bf16 (diffusers' kohya-Flux converter hardcodes the 3072-wide linear1 split).
"""

from __future__ import annotations

import json
import re
import struct
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import safetensors.torch  # noqa: E402
import torch  # noqa: E402

from tests.oracles import diffusers_oracle, tiny_models  # noqa: E402

FIXTURES = REPO / "fixtures"
MAX_BYTES = 1 << 20

RANK = 4
PEFT_ALPHA = 8  # != RANK on purpose: diffusers then depends on lora_adapter_metadata
KOHYA_ALPHA = 2.0  # != RANK on purpose
WIDE_RANK = 1

SD_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "proj_in", "proj_out"]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
FLUX_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "proj_mlp", "proj_out", "norm_out.linear",
]  # fmt: skip
# FLUX.2 and SD3 as regexes (peft full-matches a string): FLUX.2's single-block `attn.to_out` is a Linear where the
# double block's `attn.to_out` is a ModuleList, so a suffix list cannot name one without the other.
FLUX2_TARGETS = (r".*\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|linear_in|linear_out"
                 r"|to_qkv_mlp_proj)|single_transformer_blocks\.\d+\.attn\.to_out|proj_out|norm_out\.linear"
                 r"|x_embedder|context_embedder|.*_modulation_?\w*\.linear|time_guidance_embed\..*\.linear_\d")
SD3_TARGETS = (r".*\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|ff\.net\.0\.proj|ff\.net\.2"
               r"|ff_context\.net\.0\.proj|ff_context\.net\.2|norm1\.linear|norm1_context\.linear)"
               r"|proj_out|norm_out\.linear|context_embedder|time_text_embed\..*\.linear_\d")
# SDXL's third level has 10 transformer blocks per attention; keep blocks 0, 1 and 9 so the file stays < 1 MB.
SDXL_EXCLUDE = r".*\.transformer_blocks\.[2-8]\..*"

SEEDS = {"sd15": 2101, "sdxl": 2102, "flux1": 2103, "flux2": 2104, "sd3": 2105, "sdxl_sgm": 2201, "flux1_bfl": 2202,
         "flux1_bfl_wide": 2203}


def _generator(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(SEEDS[name])


# --------------------------------------------------------------------------- a. PEFT via peft + save_lora_weights


def _peft_models(arch: str):
    """(denoiser component name, denoiser, [(text encoder component name, model)], denoiser LoraConfig kwargs)."""
    if arch == "sd15":
        return "unet", tiny_models.tiny_sd15_unet(), [("text_encoder", tiny_models.tiny_clip_l())], {}
    if arch == "sdxl":
        encoders = [("text_encoder", tiny_models.tiny_clip_l()), ("text_encoder_2", tiny_models.tiny_clip_g())]
        return "unet", tiny_models.tiny_sdxl_unet(), encoders, {"exclude_modules": SDXL_EXCLUDE}
    if arch == "flux2":
        return "transformer", tiny_models.tiny_flux2(), [], {}
    if arch == "sd3":
        encoders = [("text_encoder", tiny_models.tiny_clip_l()), ("text_encoder_2", tiny_models.tiny_clip_g())]
        return "transformer", tiny_models.tiny_sd3(), encoders, {}
    return "transformer", tiny_models.tiny_flux(), [("text_encoder", tiny_models.tiny_clip_l())], {}


def _sorted_metadata(metadata: dict) -> dict:
    """peft keeps target_modules as a set, whose JSON order follows string hashing; sort it for stable bytes."""
    out = {}
    for key, config in metadata.items():
        config = dict(config)
        for field in ("target_modules", "exclude_modules"):
            if isinstance(config.get(field), (set, list, tuple)):
                config[field] = sorted(config[field])
        out[key] = config
    return out


def make_peft(arch: str) -> Path:
    from diffusers.training_utils import _collate_lora_metadata
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    denoiser_name, denoiser, encoders, extra = _peft_models(arch)
    targets = {"flux1": FLUX_TARGETS, "flux2": FLUX2_TARGETS, "sd3": SD3_TARGETS}.get(arch, SD_UNET_TARGETS)
    gen = _generator(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEEDS[arch])  # lora_A init ("gaussian") draws from the global generator
        denoiser.add_adapter(
            LoraConfig(r=RANK, lora_alpha=PEFT_ALPHA, init_lora_weights="gaussian", target_modules=targets, **extra)
        )
        for _, encoder in encoders:
            encoder.add_adapter(
                LoraConfig(r=RANK, lora_alpha=PEFT_ALPHA, init_lora_weights="gaussian", target_modules=CLIP_TARGETS)
            )
    modules = {denoiser_name: denoiser, **dict(encoders)}
    for model in modules.values():  # lora_B starts at zero; give it values
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.copy_(torch.randn(param.shape, generator=gen) * 0.1)

    layers = {f"{name}_lora_layers": get_peft_model_state_dict(model) for name, model in modules.items()}
    metadata = _sorted_metadata(_collate_lora_metadata(modules))
    path = FIXTURES / f"{arch}_peft.safetensors"
    diffusers_oracle._pipeline_class(arch).save_lora_weights(
        FIXTURES, weight_name=path.name, safe_serialization=True, **layers, **metadata
    )
    _sort_header_metadata(path)
    header = _header(path)
    assert "lora_adapter_metadata" in header, sorted(header)
    return path


def _sort_header_metadata(path: Path) -> None:
    """safetensors writes ``__metadata__`` from a hash map, so the order of its entries ("format",
    "lora_adapter_metadata") changes from run to run.  Rewrite the header with them sorted: same JSON content, same
    length, stable bytes."""
    with open(path, "r+b") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        raw = f.read(size)
        header = json.loads(raw)
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        canonical = json.dumps(header, separators=(",", ":")).encode()
        assert len(canonical) == len(raw.rstrip(b" ")), "header is not safetensors' compact JSON"
        f.seek(8)
        f.write(canonical.ljust(size, b" "))


# --------------------------------------------------------------------------- b. kohya with diffusers names


def make_kohya_diffusers_names(arch: str) -> Path:
    """As diffusers' training scripts' --output_kohya_format: load_file -> convert_all_state_dict_to_peft ->
    convert_state_dict_to_kohya -> save_file (no metadata; alpha written by convert_state_dict_to_kohya)."""
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya

    lora_state_dict = safetensors.torch.load_file(FIXTURES / f"{arch}_peft.safetensors")
    peft_state_dict = convert_all_state_dict_to_peft(lora_state_dict)
    kohya_state_dict = convert_state_dict_to_kohya(peft_state_dict)
    path = FIXTURES / f"{arch}_kohya_diffusers_names.safetensors"
    safetensors.torch.save_file(kohya_state_dict, path)
    return path


# --------------------------------------------------------------------------- c. kohya with original names


def _kohya_pair(out: dict, name: str, module: torch.nn.Module, rows: int, rank: int, alpha: float, dtype, gen):
    """sd-scripts LoRA module: lora_down [r, in(, kh, kw)], lora_up [rows, r(, 1, 1)], 0-d alpha, all in `dtype`."""
    if isinstance(module, torch.nn.Conv2d):
        down_shape = (rank, module.in_channels, *module.kernel_size)
        up_shape = (rows, rank, 1, 1)
    else:
        assert isinstance(module, torch.nn.Linear), (name, type(module))
        down_shape, up_shape = (rank, module.in_features), (rows, rank)
    fan_in = 1
    for d in down_shape[1:]:
        fan_in *= d
    out[f"{name}.lora_down.weight"] = (torch.randn(down_shape, generator=gen) / fan_in**0.5).to(dtype)
    out[f"{name}.lora_up.weight"] = (torch.randn(up_shape, generator=gen) * 0.1).to(dtype)
    out[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)


def _kohya_text_encoder(out: dict, prefix: str, encoder: torch.nn.Module, dtype, gen):
    """sd-scripts names text-encoder modules after the transformers-4 CLIPTextModel layout (``text_model.`` level),
    which transformers 5 CLIPTextModel lacks but CLIPTextModelWithProjection keeps."""
    pattern = re.compile(r"(text_model\.)?encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])")
    for name, module in encoder.named_modules():
        if pattern.fullmatch(name):
            hf4_name = name if name.startswith("text_model.") else f"text_model.{name}"
            _kohya_pair(out, prefix + hf4_name.replace(".", "_"), module, module.out_features, RANK, KOHYA_ALPHA, dtype, gen)


_SGM_LORA_MODULE = re.compile(
    r"time_embed\.[02]|label_emb\.0\.[02]|input_blocks\.0\.0|out\.2"  # embeddings, conv_in, conv_out
    r"|.*\.(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection)"  # resnets (LoCon 3x3 / 1x1, Linear)
    r"|input_blocks\.\d+\.0\.op|output_blocks\.\d+\.[12]\.conv"  # down/upsamplers
    r"|.*\.(proj_in|proj_out)"
    r"|.*\.transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2)"
)


def make_sdxl_kohya_sgm() -> Path:
    unet = tiny_models.tiny_sdxl_unet()
    layout = diffusers_oracle.sdxl_sgm_layout(unet)
    modules = dict(unet.named_modules())
    last_block = {}  # per SGM attention: index of its last transformer block
    for sgm in layout:
        m = re.match(r"(.*)\.transformer_blocks\.(\d+)\.", sgm)
        if m:
            last_block[m.group(1)] = max(last_block.get(m.group(1), 0), int(m.group(2)))
    gen, out = _generator("sdxl_sgm"), {}
    for sgm, pieces in sorted(layout.items()):
        if not _SGM_LORA_MODULE.fullmatch(sgm):
            continue
        m = re.match(r"(.*)\.transformer_blocks\.(\d+)\.", sgm)
        if m and int(m.group(2)) not in (0, last_block[m.group(1)]):
            continue  # first and last transformer block of each attention keep the file small
        (piece,) = pieces
        rows = piece.source_rows[1]
        _kohya_pair(out, "lora_unet_" + sgm.replace(".", "_"), modules[piece.target], rows, RANK, KOHYA_ALPHA, torch.float16, gen)
    _kohya_text_encoder(out, "lora_te1_", tiny_models.tiny_clip_l(), torch.float16, gen)
    _kohya_text_encoder(out, "lora_te2_", tiny_models.tiny_clip_g(), torch.float16, gen)
    path = FIXTURES / "sdxl_kohya_sgm.safetensors"
    safetensors.torch.save_file(out, path)
    return path


def _flux_kohya(model, layout, keep, rank: int, gen) -> dict[str, torch.Tensor]:
    modules, out = dict(model.named_modules()), {}
    for bfl, pieces in sorted(layout.items()):
        if not keep(bfl):
            continue
        rows = pieces[-1].source_rows[1]
        _kohya_pair(out, "lora_unet_" + bfl.replace(".", "_"), modules[pieces[0].target], rows, rank, KOHYA_ALPHA, torch.bfloat16, gen)
    return out


def make_flux_kohya_bfl() -> Path:
    model = tiny_models.tiny_flux()
    gen = _generator("flux1_bfl")
    # linear1 goes to the wide file; norms (query_norm.scale, ...) are not LoRA targets and not in the layout.
    out = _flux_kohya(model, diffusers_oracle.flux_bfl_layout(model), lambda bfl: not bfl.endswith(".linear1"), RANK, gen)
    _kohya_text_encoder(out, "lora_te1_", tiny_models.tiny_clip_l(), torch.bfloat16, gen)
    path = FIXTURES / "flux1_kohya_bfl.safetensors"
    safetensors.torch.save_file(out, path)
    return path


def make_flux_kohya_bfl_linear1_wide() -> Path:
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):  # names and shapes of wide_flux_single(), without its 0.76 GB of weights
        model = FluxTransformer2DModel(**tiny_models.WIDE_FLUX_CONFIG)
    keep = {"single_blocks.0.linear1", "single_blocks.0.linear2"}
    out = _flux_kohya(model, diffusers_oracle.flux_bfl_layout(model), keep.__contains__, WIDE_RANK, _generator("flux1_bfl_wide"))
    path = FIXTURES / "flux1_kohya_bfl_linear1_wide.safetensors"
    safetensors.torch.save_file(out, path)
    return path


# --------------------------------------------------------------------------- d. verification

# fixture -> (arch, fused_weights kwargs)
FIXTURE_ARCH = {
    "sd15_peft": ("sd15", {}),
    "sdxl_peft": ("sdxl", {}),
    "flux1_peft": ("flux1", {}),
    "flux2_peft": ("flux2", {}),
    "sd3_peft": ("sd3", {}),
    "sd15_kohya_diffusers_names": ("sd15", {}),
    "sdxl_kohya_diffusers_names": ("sdxl", {}),
    "sdxl_kohya_sgm": ("sdxl", {}),
    "flux1_kohya_bfl": ("flux1", {"repair_flux_kohya_toplevel": True}),
    "flux1_kohya_bfl_linear1_wide": ("flux1", {"wide": True}),
}


def _header(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return dict(f.metadata() or {})


def verify(path: Path) -> str:
    """Load through diffusers (strict oracle) and describe what changed."""
    arch, kwargs = FIXTURE_ARCH[path.stem]
    start = time.perf_counter()
    note = ""
    if kwargs.get("repair_flux_kohya_toplevel"):
        try:
            diffusers_oracle.fused_weights(arch, path)
        except diffusers_oracle.DiffusersOracleError:
            note = " (strict load raises: diffusers drops the top-level modules; loaded with repair)"
        else:
            raise AssertionError(f"{path.name}: expected diffusers to drop the top-level Flux modules")
    fused = diffusers_oracle.fused_weights(arch, path, **kwargs)
    base = diffusers_oracle.base_weights(arch, wide=kwargs.get("wide", False))
    changed = [k for k in fused if not torch.equal(fused[k], base[k])]
    per_component = {}
    for key in changed:
        component = key.split(".")[0]
        per_component[component] = per_component.get(component, 0) + 1
    return f"diffusers OK in {time.perf_counter() - start:.1f} s, changed weights {per_component}{note}"


def summary(path: Path) -> str:
    tensors = safetensors.torch.load_file(path)
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in tensors.values()})
    header = _header(path)
    extra = ", lora_adapter_metadata" if "lora_adapter_metadata" in header else ""
    size = path.stat().st_size
    assert size < MAX_BYTES, f"{path.name} is {size} bytes"
    return f"{path.name}: {len(tensors)} keys, {size:,} bytes, {'/'.join(dtypes)}{extra}"


def main() -> None:
    FIXTURES.mkdir(exist_ok=True)
    makers = {
        "sd15_peft": lambda: make_peft("sd15"),
        "sdxl_peft": lambda: make_peft("sdxl"),
        "flux1_peft": lambda: make_peft("flux1"),
        "flux2_peft": lambda: make_peft("flux2"),
        "sd3_peft": lambda: make_peft("sd3"),
        "sd15_kohya_diffusers_names": lambda: make_kohya_diffusers_names("sd15"),
        "sdxl_kohya_diffusers_names": lambda: make_kohya_diffusers_names("sdxl"),
        "sdxl_kohya_sgm": make_sdxl_kohya_sgm,
        "flux1_kohya_bfl": make_flux_kohya_bfl,
        "flux1_kohya_bfl_linear1_wide": make_flux_kohya_bfl_linear1_wide,
    }
    wanted = sys.argv[1:] or list(makers)
    unknown = sorted(set(wanted) - set(makers))
    if unknown:
        raise SystemExit(f"unknown fixture(s) {unknown}; known: {', '.join(makers)}")
    for make in (makers[name] for name in wanted):
        start = time.perf_counter()
        path = make()
        built = time.perf_counter() - start
        print(f"{summary(path)}; written in {built:.1f} s; {verify(path)}", flush=True)


if __name__ == "__main__":
    main()
