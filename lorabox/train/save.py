"""From trained PEFT layers to a LoRA file: PEFT state dict -> canonical Lora -> the chosen dialect, with kohya's
ss_* and Stability's modelspec metadata and the full training config."""
from __future__ import annotations

import datetime
import json
from pathlib import Path

import numpy as np

from .. import __version__
from ..conversion import convert, lora_from_state_dict
from ..dialects import PEFT_METADATA_KEY
from ..io.safetensors import write_tensors
from ..keymap import load_architecture
from ..lora import Lora
from ..tensor import Tensor

SAVE_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
# kohya's ss_base_model_version spellings (FIELD_NOTES section 5); FLUX.2 has none in kohya: ai-toolkit's
SS_BASE_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0", "sd3": "sd3", "flux1": "flux1", "flux2": "flux2"}
IMPLEMENTATION = {"sdxl": "https://github.com/Stability-AI/generative-models",
                  "flux1": "https://github.com/black-forest-labs/flux",
                  "flux2": "https://github.com/black-forest-labs/flux2"}


def peft_state_dict(model) -> dict:
    """The LoRA tensors of a PEFT-injected diffusers model, PEFT-spelled without the adapter name."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def to_lora(peft_sd: dict, *, arch: str, prefix: str, rank: int, alpha: float, dtype: str = "F32") -> Lora:
    """The canonical Lora of trained PEFT layers (lorabox's diffusers reader, with the alpha as PEFT metadata)."""
    tensors = {prefix + k: Tensor.from_values(v.detach().float().cpu().numpy().astype(np.float64), dtype)
               for k, v in peft_sd.items()}
    meta = {PEFT_METADATA_KEY: json.dumps({prefix + "r": rank, prefix + "lora_alpha": alpha})}
    lora = lora_from_state_dict(tensors, meta, arch=arch, source="trained adapter")
    lora.metadata = {}
    return lora


def metadata(cfg, *, arch: str, steps: int, objective: str, extra: dict | None = None) -> dict[str, str]:
    """ss_* (kohya) and modelspec (Stability ModelSpec 1.0.1) fields plus `lorabox.train` (the full config)."""
    spec = load_architecture(arch).modelspec
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": str(cfg.alpha),
        "ss_network_args": "{}",
        "ss_base_model_version": SS_BASE_VERSION.get(arch, arch),
        "ss_v2": "False",
        "ss_sd_model_name": Path(cfg.base).name,
        "ss_output_name": cfg.name,
        "ss_steps": str(steps),
        "ss_max_train_steps": str(cfg.steps),
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_unet_lr": str(cfg.learning_rate),
        "ss_text_encoder_lr": "0",
        "ss_train_batch_size": str(cfg.batch_size),
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_seed": str(cfg.seed),
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_optimizer": cfg.optimizer,
        "ss_min_snr_gamma": str(cfg.min_snr_gamma),
        "ss_training_finished_at": now,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{spec or arch}/lora",
        "modelspec.implementation": IMPLEMENTATION.get(arch, "diffusers"),
        "modelspec.title": cfg.name,
        "modelspec.date": now,
        "modelspec.description": f"LoRA rank {cfg.rank} trained by lorabox {__version__} for {steps} steps "
                                 f"({objective}).",
        "modelspec.prediction_type": {"flow": "flow", "epsilon": "epsilon", "v_prediction": "v"}.get(objective, ""),
        "lorabox.train": json.dumps({"architecture": arch, "base": Path(cfg.base).name, "steps": steps,
                                     "objective": objective, "lorabox": __version__, "config": cfg.as_dict(),
                                     **(extra or {})}, sort_keys=True),
    }
    if cfg.trigger:
        meta["modelspec.trigger_phrase"] = cfg.trigger
        meta["ss_tag_frequency"] = json.dumps({f"1_{cfg.trigger}": {cfg.trigger: 1}})
    return meta


def save_adapter(lora: Lora, path: str | Path, *, fmt: str, meta: dict[str, str]) -> dict:
    """Write `lora` in dialect `fmt` atomically; returns the conversion report."""
    result = convert(lora, fmt)
    result.metadata.pop("lorabox.convert", None)  # nothing was converted from a file; `lorabox.train` says what was
    result.metadata.update(meta)
    write_tensors(path, result.tensors, result.metadata)
    result.output = str(path)
    return result.report()
