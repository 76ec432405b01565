"""Tiny diffusers / transformers models with the module topology (key names) of the published ones.

Every model is built from a config class (no model hub, no download) with a fixed seed, so two calls
give identical weights.  Widths are tiny; the *names* of the modules are those of the full-size
model (same number of blocks, layers per block, transformer depth, projection kind, ...), which is
what a LoRA key converter is tested against.

Only ``wide_flux_single()`` is large: diffusers' kohya-Flux converter hardcodes the 3072-wide split
of ``single_blocks.*.linear1`` (ORACLES.md section 4), so it needs Flux.1's real hidden size.
"""

from __future__ import annotations

import contextlib
import functools

import torch

# Seeds: one per model so that building one model never shifts another's weights.
SEED_SD15_UNET = 1501
SEED_SDXL_UNET = 1502
SEED_FLUX = 1503
SEED_WIDE_FLUX = 1504
SEED_CLIP_L = 1505
SEED_CLIP_G = 1506
SEED_T5 = 1507
SEED_FLUX2 = 1508
SEED_SD3 = 1509
SEED_WAN = 1510

# Text encoder widths.  CLIP-L and CLIP-G differ on purpose, so a mix-up between SDXL's encoders changes shapes.
CLIP_L_HIDDEN = 32
CLIP_G_HIDDEN = 48
CLIP_G_PROJECTION = 40
T5_D_MODEL = 32
TEXT_LAYERS = 2  # real: CLIP-L 12, CLIP-G 32, T5-XXL 24; 2 keeps layer indices 0 and 1 distinct

# SDXL conditioning: cross-attention sees concat(CLIP-L, CLIP-G) hidden states (768 + 1280 = 2048 at full size);
# add_embedding sees the CLIP-G pooled projection + 6 time ids * addition_time_embed_dim (1280 + 6 * 256 = 2816).
SDXL_ADDITION_TIME_EMBED_DIM = 8
SDXL_CROSS_ATTENTION_DIM = CLIP_L_HIDDEN + CLIP_G_HIDDEN
SDXL_PROJECTION_CLASS_EMBEDDINGS_INPUT_DIM = CLIP_G_PROJECTION + 6 * SDXL_ADDITION_TIME_EMBED_DIM

SD15_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 24, 32, 32),  # SD1.5: (320, 640, 1280, 1280); narrow so LoRA fixtures stay < 1 MB
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    norm_num_groups=8,
    cross_attention_dim=CLIP_L_HIDDEN,
    attention_head_dim=2,  # diffusers' name for the number of heads (SD1.5: 8)
    use_linear_projection=False,
    transformer_layers_per_block=1,
)

SDXL_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 24, 32),  # SDXL: (320, 640, 1280); narrow so a full SDXL-topology LoRA stays < 1 MB
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(2, 4, 4),  # SDXL: (5, 10, 20)
    norm_num_groups=8,
    cross_attention_dim=SDXL_CROSS_ATTENTION_DIM,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=SDXL_ADDITION_TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=SDXL_PROJECTION_CLASS_EMBEDDINGS_INPUT_DIM,
)

FLUX_CONFIG = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,  # hidden 32
    joint_attention_dim=T5_D_MODEL,
    pooled_projection_dim=CLIP_L_HIDDEN,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)

# FLUX.2 (dev topology: guidance embedder; Klein has none): two of each block kind, hidden 32.
FLUX2_CONFIG = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    timestep_guidance_channels=16,
    axes_dims_rope=(4, 4, 4, 4),
    guidance_embeds=True,
)

# SD3.5 Medium topology (24 blocks, the last context-only, second attention in blocks 0-12), hidden 16.
SD3_CONFIG = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=24,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=24,
    caption_projection_dim=16,
    pooled_projection_dim=12,
    pos_embed_max_size=8,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)

# Wan2.1 I2V topology (the whole wan.toml table: image cross-attention k_img/v_img and the CLIP image embedder), hidden
# 16 = 2 heads x 8; 2 blocks; distinct widths everywhere (in 4, out 4, text 24, freq 8, ffn 40, CLIP 12).
WAN_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=4,
    text_dim=24,
    freq_dim=8,
    ffn_dim=40,
    num_layers=2,
    image_dim=12,
    added_kv_proj_dim=16,
    rope_max_seq_len=32,
)

WIDE_FLUX_CONFIG = dict(FLUX_CONFIG, num_layers=0, num_single_layers=1, attention_head_dim=128, num_attention_heads=24)

# The full-size published configs (ORACLES.md section 2), to check that the tiny models' keys match.
FULL_SD15_CONFIG = dict(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
FULL_SDXL_CONFIG = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)
FULL_FLUX1_DEV_CONFIG = dict(
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

FULL_SD35_MEDIUM_CONFIG = dict(
    num_layers=24,
    num_attention_heads=24,
    caption_projection_dim=1536,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch's CPU generator for the block without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _finish(model: torch.nn.Module) -> torch.nn.Module:
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------- denoisers


def tiny_sd15_unet():
    from diffusers import UNet2DConditionModel

    with _seeded(SEED_SD15_UNET):
        return _finish(UNet2DConditionModel(**SD15_CONFIG))


def tiny_sdxl_unet():
    from diffusers import UNet2DConditionModel

    with _seeded(SEED_SDXL_UNET):
        return _finish(UNet2DConditionModel(**SDXL_CONFIG))


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    with _seeded(SEED_FLUX):
        return _finish(FluxTransformer2DModel(**FLUX_CONFIG))


def tiny_flux2():
    from diffusers import Flux2Transformer2DModel

    with _seeded(SEED_FLUX2):
        return _finish(Flux2Transformer2DModel(**FLUX2_CONFIG))


def tiny_wan():
    from diffusers import WanTransformer3DModel

    with _seeded(SEED_WAN):
        return _finish(WanTransformer3DModel(**WAN_CONFIG))


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    with _seeded(SEED_SD3):
        return _finish(SD3Transformer2DModel(**SD3_CONFIG))


def wide_flux_single():
    """Flux.1 at its real width (24 heads x 128 = 3072) with 0 double and 1 single block: 190.7 M fp32
    parameters (0.76 GB), about 1.5-2 s to build on 2 cores.  Needed only for kohya ``single_blocks.*.linear1``."""
    from diffusers import FluxTransformer2DModel

    with _seeded(SEED_WIDE_FLUX):
        return _finish(FluxTransformer2DModel(**WIDE_FLUX_CONFIG))


# --------------------------------------------------------------------------- text encoders


def tiny_clip_l():
    """CLIP-L shaped ``CLIPTextModel`` (transformers 5: keys have no ``text_model.`` level)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=CLIP_L_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4,
        max_position_embeddings=77,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        hidden_act="quick_gelu",
        projection_dim=CLIP_L_HIDDEN,
    )
    with _seeded(SEED_CLIP_L):
        return _finish(CLIPTextModel(config))


def tiny_clip_g():
    """OpenCLIP bigG shaped ``CLIPTextModelWithProjection`` (keys keep ``text_model.`` + ``text_projection``)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=CLIP_G_HIDDEN,
        intermediate_size=96,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4,
        max_position_embeddings=77,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        hidden_act="gelu",
        projection_dim=CLIP_G_PROJECTION,
    )
    with _seeded(SEED_CLIP_G):
        return _finish(CLIPTextModelWithProjection(config))


def tiny_t5():
    """T5 v1.1 shaped ``T5EncoderModel`` (gated-gelu: ``DenseReluDense.wi_0`` / ``wi_1`` / ``wo``)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=1000,
        d_model=T5_D_MODEL,
        d_kv=8,
        d_ff=64,
        num_layers=TEXT_LAYERS,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
    )
    with _seeded(SEED_T5):
        return _finish(T5EncoderModel(config))


# --------------------------------------------------------------------------- pipelines


def sd15_pipeline():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=None,
        text_encoder=tiny_clip_l(),
        tokenizer=None,
        unet=tiny_sd15_unet(),
        scheduler=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sdxl_pipeline():
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=None,
        text_encoder=tiny_clip_l(),
        text_encoder_2=tiny_clip_g(),
        tokenizer=None,
        tokenizer_2=None,
        unet=tiny_sdxl_unet(),
        scheduler=None,
        add_watermarker=False,
    )


def flux_pipeline(wide: bool = False):
    from diffusers import FluxPipeline

    return FluxPipeline(
        scheduler=None,
        vae=None,
        text_encoder=tiny_clip_l(),
        tokenizer=None,
        text_encoder_2=tiny_t5(),
        tokenizer_2=None,
        transformer=wide_flux_single() if wide else tiny_flux(),
    )


def flux2_pipeline():
    """FLUX.2's pipeline around the tiny transformer only (LoRA goes into the transformer alone)."""
    from diffusers import Flux2Pipeline

    return Flux2Pipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=tiny_flux2())


def sd3_pipeline():
    """SD3's pipeline with the tiny MMDiT and the two CLIPs its loader puts LoRA into (T5 gets none)."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=tiny_sd3(), scheduler=None, vae=None, text_encoder=tiny_clip_l(), tokenizer=None,
        text_encoder_2=tiny_clip_g(), tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )


def wan_pipeline():
    """Wan's text-to-video pipeline around the tiny transformer only (its loader puts LoRA into the transformer alone)."""
    from diffusers import WanPipeline

    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=tiny_wan())


PIPELINES = {"sd15": sd15_pipeline, "sdxl": sdxl_pipeline, "flux1": flux_pipeline, "flux2": flux2_pipeline,
             "sd3": sd3_pipeline, "wan": wan_pipeline}


def pipeline(arch: str, wide: bool = False):
    """A fresh tiny pipeline for ``arch`` in ``PIPELINES``; ``wide`` only for "flux1"."""
    if arch not in PIPELINES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(PIPELINES)}")
    if arch == "flux1":
        return flux_pipeline(wide=wide)
    if wide:
        raise ValueError("wide=True exists only for flux1")
    return PIPELINES[arch]()


@functools.cache
def full_size_keys(arch: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the full-size published denoiser, built on the meta device (no memory, no weights)."""
    from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    cls, config = {
        "sd15": (UNet2DConditionModel, FULL_SD15_CONFIG),
        "sdxl": (UNet2DConditionModel, FULL_SDXL_CONFIG),
        "flux1": (FluxTransformer2DModel, FULL_FLUX1_DEV_CONFIG),
        "flux2": (Flux2Transformer2DModel, {}),  # the class defaults are FLUX.2 dev's
        "sd3": (SD3Transformer2DModel, FULL_SD35_MEDIUM_CONFIG),
    }[arch]
    with torch.device("meta"):
        model = cls(**config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
