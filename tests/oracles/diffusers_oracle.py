"""diffusers' own LoRA loader as a test oracle (ORACLES.md section 4), on the tiny models of ``tiny_models``.

``fused_weights(arch, lora)`` builds a fresh tiny pipeline, lets diffusers load the LoRA (any dialect diffusers
reads: PEFT with or without ``lora_adapter_metadata``, kohya with diffusers or original names, ...), fuses it
into every component and returns the resulting weights.  ``fused - base_weights(arch)`` is exactly what
diffusers applies.

The oracle is strict: it raises ``DiffusersOracleError`` (an ``AssertionError``) when

* diffusers, transformers or peft log or warn about keys they did not use ("unexpected keys", "missing keys",
  "Incompatible keys", "No LoRA keys associated ..." for a component the converted LoRA has keys for,
  "unsupported ... filter out", "alpha_pattern keys did not match", shape expansion, ...), or
* a key is silently lost: the input has kohya keys of a component the pipeline's converter filters out
  (Flux ``lora_te3_``), diffusers' converted state dict (``Pipeline.lora_state_dict``) has a key whose prefix is
  not a component the pipeline loads into, or the number of LoRA matrices per component differs from the number
  of modules peft injected.

The second check exists because diffusers 0.42.1 drops some keys without any message (see
``KNOWN_DIFFUSERS_BUGS``).

``flux_bfl_layout`` / ``sdxl_sgm_layout`` give, for the original (BFL / SGM) module names, which rows of which
diffusers module each original weight becomes.  They are derived by running diffusers' single-file checkpoint
converters on value-tagged tensors, so the original names and shapes come from diffusers' code, not from us.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from . import tiny_models

ARCHS = ("sd15", "sdxl", "flux1", "flux2", "sd3")  # with a PEFT fixture and self-checks (diffusers_oracle_selfcheck)
LOADS = ARCHS + ("wan",)  # what fused_weights accepts: Wan is checked in tests/test_wan.py only
DENOISER = {"sd15": "unet", "sdxl": "unet", "flux1": "transformer", "flux2": "transformer", "sd3": "transformer",
            "wan": "transformer"}
# Components whose weights fused_weights returns.
COMPONENTS = {
    "sd15": ("unet", "text_encoder"),
    "sdxl": ("unet", "text_encoder", "text_encoder_2"),
    "flux1": ("transformer", "text_encoder", "text_encoder_2"),  # text_encoder_2 = T5: diffusers never loads LoRA into it
    "flux2": ("transformer",),
    "sd3": ("transformer", "text_encoder", "text_encoder_2"),
    "wan": ("transformer",),
}
# Components diffusers' pipeline loader puts LoRA layers into.
LORA_COMPONENTS = {
    "sd15": ("unet", "text_encoder"),
    "sdxl": ("unet", "text_encoder", "text_encoder_2"),
    "flux1": ("transformer", "text_encoder"),
    "flux2": ("transformer",),
    "sd3": ("transformer", "text_encoder", "text_encoder_2"),
    "wan": ("transformer",),
}

KNOWN_DIFFUSERS_BUGS = {
    "flux_kohya_toplevel_dropped": (
        "_convert_kohya_flux_lora_to_diffusers emits img_in/txt_in/time_in/vector_in/guidance_in/final_layer as "
        "'x_embedder.lora_A.weight', ... without the 'transformer.' prefix; load_lora_adapter(prefix='transformer') "
        "then drops them without any message."
    ),
    "flux_kohya_final_layer_alpha_ignored": (
        "assign_remaining_weights() converts final_layer.linear / final_layer.adaLN_modulation.1 without the "
        "alpha/rank scale and discards their .alpha keys."
    ),
    "flux_kohya_t5_dropped": (
        "lora_te3_ (T5) keys are filtered out silently by the key filter of _convert_kohya_flux_lora_to_diffusers."
    ),
    "sd_kohya_alpha_pattern": (
        "kohya SD/SDXL alphas that differ from the most common alpha are lost for unet attention modules "
        "(_get_alpha_name gives '...attn1.processor.to_q_lora.down.weight.alpha') and for every module of a "
        "transformers-5 CLIPTextModel (alpha_pattern keeps 'text_model.', the state dict does not); the module "
        "gets the most common alpha (peft RuntimeWarning 'alpha_pattern keys did not match any targeted module')."
    ),
    "flux2_kohya_drops_modulation": (
        "_convert_kohya_flux2_lora_to_diffusers has no entry for guidance_in, the shared modulations "
        "(double_stream_modulation_img/txt.lin, single_stream_modulation.lin) and final_layer.adaLN_modulation.1: it "
        "logs 'Unsupported keys for Kohya Flux2 LoRA conversion' and drops them."
    ),
    "flux2_comfyui_spelling_unread": (
        "Flux2LoraLoaderMixin.lora_state_dict sends every file with a '.lora_down.weight' key to the kohya converter, "
        "which reads 'lora_unet_' keys only: ComfyUI's own spelling (diffusion_model. + BFL names + lora_down/up + "
        ".alpha) loads nothing."
    ),
    "sd3_only_peft_spelling": (
        "SD3LoraLoaderMixin.lora_state_dict converts nothing: kohya (lora_unet_joint_blocks_...) and ComfyUI "
        "(diffusion_model.joint_blocks...) files load into no component."
    ),
    "flux2_ai_toolkit_final_layer_not_swapped": (
        "_convert_non_diffusers_flux2_lora_to_diffusers maps final_layer.adaLN_modulation.1 to norm_out.linear without "
        "the shift/scale swap diffusers' own single-file converter makes for the same weight."
    ),
    "wan_trainer_dialects_blocks_only": (
        "_convert_musubi_wan_lora_to_diffusers reads blocks only (a lora_unet_ key outside blocks_N fails with an "
        "IndexError) and pops q/k/v/o/ffn of blocks 0..count-1 (a LoRA on some blocks or modules only: KeyError); _convert_non_diffusers_wan_lora_to_diffusers (diffusion_model. spelling) has no entry for "
        "patch_embedding and never pops the .alpha of text_embedding / time_embedding / head.head / img_emb, so such "
        "a file is refused ('state_dict should be empty')."
    ),
}


class DiffusersOracleError(AssertionError):
    """diffusers did not consume the LoRA cleanly."""


# --------------------------------------------------------------------------- diagnostics capture

_LIBRARY_LOGGERS = ("diffusers", "transformers", "peft")
_PROBLEM = re.compile(
    r"unexpected|incompatible|missing key|no lora keys|unsupported|not supported|filter(ed)? out|purge|"
    r"ignored|not loaded|not used|could not|did not match|zero padded|expanded|load report|dora",
    re.IGNORECASE,
)
# Messages that do not mean a key was lost: diffusers injects LoRA layers from the state dict's own module names, so
# a lora_adapter_metadata exclude_modules pattern never has anything left to exclude.
_BENIGN = re.compile(r"You have passed exclude_modules=.* but no modules were excluded")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # transformers colours its load report
_NO_LORA_KEYS = re.compile(r"No LoRA keys associated to \w+ found with the prefix='(\w+)'")


class _Capture(logging.Handler):
    """Collects every record of the library loggers (DEBUG and up) and every Python warning."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[tuple[str, int, str]] = []

    def emit(self, record):
        self.records.append((record.name, record.levelno, _ANSI.sub("", record.getMessage())))

    def __enter__(self):
        self._saved = []
        for name in _LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            handler_levels = [(h, h.level) for h in logger.handlers]
            for h, _ in handler_levels:  # the oracle reports what matters; keep the console quiet meanwhile
                h.setLevel(logging.CRITICAL + 1)
            self._saved.append((logger, logger.level, logger.propagate, handler_levels))
            logger.propagate = False
            logger.setLevel(logging.DEBUG)
            logger.addHandler(self)
        from transformers.utils import logging as transformers_logging

        self._progress_bar = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()  # transformers' load_adapter draws one per text encoder
        self._warnings = warnings.catch_warnings(record=True)
        self.warnings = self._warnings.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._warnings.__exit__(*exc)
        if self._progress_bar:
            from transformers.utils import logging as transformers_logging

            transformers_logging.enable_progress_bar()
        for logger, level, propagate, handler_levels in self._saved:
            logger.removeHandler(self)
            logger.setLevel(level)
            logger.propagate = propagate
            for h, hlevel in handler_levels:
                h.setLevel(hlevel)
        return False

    def problems(self, prefixes_with_keys: set[str]) -> list[str]:
        out = []
        for name, level, message in self.records:
            m = _NO_LORA_KEYS.search(message)
            if m and m.group(1) not in prefixes_with_keys:
                continue  # the LoRA simply has no keys for that component
            if level >= logging.WARNING or _PROBLEM.search(message):
                out.append(f"[{name} {logging.getLevelName(level)}] {message}")
        for w in self.warnings:
            if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning)) and not _PROBLEM.search(
                str(w.message)
            ):
                continue
            if _BENIGN.search(str(w.message)):
                continue
            out.append(f"[{w.category.__name__} {Path(w.filename).name}:{w.lineno}] {w.message}")
        return out


# --------------------------------------------------------------------------- loading


def _pipeline_class(arch: str):
    from diffusers import (Flux2Pipeline, FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, WanPipeline)

    return {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline, "flux1": FluxPipeline,
            "flux2": Flux2Pipeline, "sd3": StableDiffusion3Pipeline, "wan": WanPipeline}[arch]


def _check_arch(arch: str, wide: bool):
    if arch not in LOADS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {LOADS}")
    if wide and arch != "flux1":
        raise ValueError("wide=True exists only for flux1")


def _is_down_key(key: str) -> bool:
    return key.endswith((".lora_A.weight", "lora.down.weight", "lora_down.weight", "lora_linear_layer.down.weight"))


def _lora_modules(model: torch.nn.Module) -> dict[str, object]:
    """Module name -> peft LoraLayer for every module peft injected a LoRA into."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and len(m.lora_A)}


def _as_source(lora, metadata, tmpdir: str):
    """What to hand to diffusers: a file path (diffusers then reads the header's lora_adapter_metadata itself)
    or a copy of the dict (diffusers pops keys, and some converters scale tensors in place)."""
    if isinstance(lora, (str, os.PathLike)):
        if metadata is not None:
            raise ValueError("metadata is read from the file's header; pass it only with a dict")
        return os.fspath(lora)
    if not isinstance(lora, Mapping):
        raise TypeError(f"lora must be a path or a dict of tensors, not {type(lora).__name__}")
    tensors = {k: v.detach().clone().contiguous() for k, v in lora.items()}
    if metadata is None:
        return tensors
    import safetensors.torch

    if "lora_adapter_metadata" not in metadata:  # a parsed lora_adapter_metadata dict rather than a header
        metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(metadata)}
    path = os.path.join(tmpdir, "lora.safetensors")
    safetensors.torch.save_file(tensors, path, metadata=dict(metadata))
    return path


def _copy_source(source):
    return source if isinstance(source, str) else {k: v.clone() for k, v in source.items()}


def _converted(arch: str, pipe, source) -> tuple[dict[str, torch.Tensor], dict | None, dict | None]:
    """diffusers' conversion of the LoRA, as load_lora_weights computes it: (state_dict, network_alphas, metadata)."""
    cls = type(pipe)
    if arch == "flux1":
        return cls.lora_state_dict(_copy_source(source), return_alphas=True, return_lora_metadata=True)
    if arch in ("flux2", "sd3", "wan"):  # no network alphas (FLUX.2's kohya converter folds them into the factors)
        state_dict, metadata = cls.lora_state_dict(_copy_source(source), return_lora_metadata=True)
        return state_dict, None, metadata
    kwargs = {"unet_config": pipe.unet.config} if arch == "sdxl" else {}  # SD1.5's load_lora_weights passes none
    return cls.lora_state_dict(_copy_source(source), return_lora_metadata=True, **kwargs)


def _repair_flux_kohya_toplevel(pipe, source, converted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Work around KNOWN_DIFFUSERS_BUGS['flux_kohya_toplevel_dropped'] and ['flux_kohya_final_layer_alpha_ignored']:
    keep diffusers' names and scale/shift swap, add the missing 'transformer.' prefix, apply alpha/rank to the two
    final_layer modules.  Everything else stays diffusers' own conversion."""
    original = source if isinstance(source, Mapping) else _read_safetensors(source)[0]
    modules = dict(pipe.transformer.named_modules())
    final_layer = {"proj_out": "lora_unet_final_layer_linear", "norm_out.linear": "lora_unet_final_layer_adaLN_modulation_1"}
    out = {}
    for key, value in converted.items():
        module, _, suffix = key.partition(".lora_")
        if key.split(".")[0] not in LORA_COMPONENTS["flux1"] and module in modules:
            if module in final_layer and suffix.startswith("B"):
                # kohya spells it lora_unet_final_layer_linear, ComfyUI diffusion_model.final_layer.linear
                for stem in (final_layer[module], "diffusion_model." + final_layer[module][len("lora_unet_"):]
                             .replace("final_layer_", "final_layer.").replace("adaLN_modulation_1", "adaLN_modulation.1")):
                    if f"{stem}.alpha" in original:
                        rank = original[f"{stem}.lora_down.weight"].shape[0]
                        value = value * (original[f"{stem}.alpha"].item() / rank)
            key = f"transformer.{key}"
        out[key] = value
    return out


# kohya prefixes diffusers' converters route to a component of each pipeline; others are filtered out silently
# (e.g. Flux lora_te3_ = T5, KNOWN_DIFFUSERS_BUGS["flux_kohya_t5_dropped"]).
_KOHYA_PREFIX = re.compile(r"lora_(unet|transformer|te\d*)_")
_KOHYA_PREFIXES = {
    "sd15": ("lora_unet_", "lora_te_", "lora_te1_"),
    "sdxl": ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"),
    "flux1": ("lora_unet_", "lora_transformer_", "lora_te_", "lora_te1_"),
    "flux2": ("lora_unet_",),
    "sd3": (),
    "wan": ("lora_unet_",),
}


def _load(arch: str, lora, *, wide: bool, metadata, repair_flux_kohya_toplevel: bool, tmpdir: str):
    """A fresh tiny pipeline with the LoRA loaded (not fused), after all strictness checks."""
    _check_arch(arch, wide)
    pipe = tiny_models.pipeline(arch, wide=wide)
    source = _as_source(lora, metadata, tmpdir)
    original_keys = list(source) if isinstance(source, Mapping) else _safetensors_keys(source)
    if repair_flux_kohya_toplevel and arch != "flux1":
        raise ValueError("repair_flux_kohya_toplevel applies to flux1 only")
    with _Capture() as capture:
        try:
            converted, network_alphas, lora_metadata = _converted(arch, pipe, source)
            if repair_flux_kohya_toplevel:
                converted = _repair_flux_kohya_toplevel(pipe, source, converted)
                source = converted  # already in diffusers' PEFT format, no alpha keys left
            pipe.load_lora_weights(_copy_source(source))
        except (ValueError, KeyError, IndexError, RuntimeError, TypeError, NotImplementedError) as error:
            raise DiffusersOracleError(f"diffusers refused the LoRA: {type(error).__name__}: {error}") from error

    problems = capture.problems({k.split(".")[0] for k in converted})
    unsupported = sorted(
        k for k in original_keys if _KOHYA_PREFIX.match(k) and not k.startswith(_KOHYA_PREFIXES[arch])
    )
    if unsupported:
        problems.append(f"kohya keys of a component diffusers' {arch} loader ignores: {unsupported}")
    loaded = set(LORA_COMPONENTS[arch])
    dropped = sorted(k for k in converted if k.split(".")[0] not in loaded)
    if dropped:
        problems.append(f"converted keys with no component diffusers loads into (silently dropped): {dropped}")
    for component in loaded:
        expected = sorted(k for k in converted if k.startswith(f"{component}.") and _is_down_key(k))
        injected = sorted(_lora_modules(getattr(pipe, component)))
        if len(expected) != len(injected):
            problems.append(
                f"{component}: {len(expected)} LoRA down matrices after diffusers' conversion but peft injected "
                f"{len(injected)} modules; converted: {expected}; injected: {injected}"
            )
    if problems:
        raise DiffusersOracleError("diffusers did not load the LoRA cleanly:\n  " + "\n  ".join(problems))
    return pipe, converted, network_alphas, lora_metadata


def _weights(arch: str, pipe) -> dict[str, torch.Tensor]:
    out = {}
    for component in COMPONENTS[arch]:
        for key, value in getattr(pipe, component).state_dict().items():
            out[f"{component}.{key}"] = value.detach().to(torch.float32)
    return out


@functools.lru_cache(maxsize=None)
def _base_weights_cached(arch: str) -> dict[str, torch.Tensor]:
    return _weights(arch, tiny_models.pipeline(arch))


def base_weights(arch: str, wide: bool = False) -> dict[str, torch.Tensor]:
    """Weights of the fresh tiny pipeline, keys prefixed by component (``unet.``, ``transformer.``,
    ``text_encoder.``, ``text_encoder_2.``).  Cached for wide=False: do not modify the tensors in place."""
    _check_arch(arch, wide)
    if wide:
        return _weights(arch, tiny_models.pipeline(arch, wide=True))
    return dict(_base_weights_cached(arch))


def fused_weights(
    arch: str,
    lora: Mapping[str, torch.Tensor] | str | os.PathLike,
    *,
    wide: bool = False,
    metadata: Mapping[str, object] | None = None,
    repair_flux_kohya_toplevel: bool = False,
) -> dict[str, torch.Tensor]:
    """Weights of a fresh tiny pipeline after diffusers' ``load_lora_weights`` + ``fuse_lora`` (all components).

    ``lora``: a state dict, or a path to a .safetensors file (diffusers then reads ``lora_adapter_metadata`` from
    its header, as it does for real files).  ``metadata``: with a dict, the safetensors header to load it with
    (``{"lora_adapter_metadata": json}``) or the parsed lora_adapter_metadata; without it a PEFT dict is read with
    ``lora_alpha = r``.  ``repair_flux_kohya_toplevel``: see ``_repair_flux_kohya_toplevel``.
    Raises ``DiffusersOracleError`` when diffusers does not consume every key (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmpdir:
        pipe, *_ = _load(
            arch, lora, wide=wide, metadata=metadata, repair_flux_kohya_toplevel=repair_flux_kohya_toplevel, tmpdir=tmpdir
        )
    with _Capture() as capture:
        pipe.fuse_lora(components=list(LORA_COMPONENTS[arch]))
        pipe.unload_lora_weights()  # fused weights stay, the LoRA layers go
    problems = capture.problems(set())
    if problems:
        raise DiffusersOracleError("diffusers reported problems while fusing:\n  " + "\n  ".join(problems))
    fused = _weights(arch, pipe)
    base_keys = set(_base_weights_cached(arch)) if not wide else None
    if base_keys is not None and set(fused) != base_keys:
        raise DiffusersOracleError(f"fused model keys differ from the base model: {sorted(set(fused) ^ base_keys)[:10]}")
    return fused


def lora_deltas(arch: str, lora, **kwargs) -> dict[str, torch.Tensor]:
    """``fused - base`` for every weight diffusers changed (keys as in ``fused_weights``)."""
    fused = fused_weights(arch, lora, **kwargs)
    base = base_weights(arch, wide=kwargs.get("wide", False))
    return {k: fused[k] - base[k] for k in fused if not torch.equal(fused[k], base[k])}


@dataclasses.dataclass(frozen=True)
class DiffusersLora:
    """How diffusers reads a LoRA file.

    state_dict: PEFT names with component prefix (``unet.down_blocks.0...to_q.lora_A.weight``,
        ``text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight``), i.e. what peft's
        ``set_peft_model_state_dict`` receives per component (values after diffusers' conversion, so e.g. kohya Flux
        already carries alpha/rank in A and B and splits fused qkv).
    network_alphas: the alphas diffusers extracted (kohya SD/SDXL ``{"unet.<module>.alpha": value}``), else None.
    metadata: the parsed ``lora_adapter_metadata`` diffusers found, else None.
    scales: ``module -> lora_alpha / r`` that peft applies, per injected module, keys with component prefix.
    """

    state_dict: dict[str, torch.Tensor]
    network_alphas: dict[str, float] | None
    metadata: dict[str, object] | None
    scales: dict[str, float]


def _to_peft_names(arch: str, pipe, converted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply the key conversions diffusers applies inside load_lora_adapter / _load_lora_into_text_encoder."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    out = {}
    for component in LORA_COMPONENTS[arch]:
        part = {k[len(component) + 1 :]: v for k, v in converted.items() if k.startswith(f"{component}.")}
        if not part:
            continue
        if component in ("unet", "transformer"):
            if "lora_A" not in next(iter(part)):
                part = convert_unet_state_dict_to_peft(part)
        else:
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
            if not hasattr(getattr(pipe, component), "text_model"):
                part = {k.removeprefix("text_model."): v for k, v in part.items()}
        out.update({f"{component}.{k}": v for k, v in part.items()})
    return out


def diffusers_lora_state_dict(
    arch: str,
    lora: Mapping[str, torch.Tensor] | str | os.PathLike,
    *,
    wide: bool = False,
    metadata: Mapping[str, object] | None = None,
    repair_flux_kohya_toplevel: bool = False,
) -> DiffusersLora:
    """The PEFT-format state dict diffusers converts ``lora`` to (via ``Pipeline.lora_state_dict``), its
    ``network_alphas`` and the per-module scale peft ends up using.  Same strictness as ``fused_weights``."""
    with tempfile.TemporaryDirectory() as tmpdir:
        pipe, converted, network_alphas, lora_metadata = _load(
            arch, lora, wide=wide, metadata=metadata, repair_flux_kohya_toplevel=repair_flux_kohya_toplevel, tmpdir=tmpdir
        )
    scales = {}
    for component in LORA_COMPONENTS[arch]:
        for name, layer in _lora_modules(getattr(pipe, component)).items():
            (adapter,) = layer.scaling
            scales[f"{component}.{name}"] = float(layer.scaling[adapter])
    state_dict = {k: v.detach().clone() for k, v in _to_peft_names(arch, pipe, converted).items()}
    return DiffusersLora(state_dict, network_alphas or None, lora_metadata, scales)


def _safetensors_keys(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(os.fspath(path), "pt") as f:
        return list(f.keys())


def _read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(os.fspath(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


# --------------------------------------------------------------------------- original-name layouts


@dataclasses.dataclass(frozen=True)
class Piece:
    """Rows ``source_rows`` of an original (BFL / SGM) weight are rows ``target_rows`` of diffusers module ``target``."""

    source_rows: tuple[int, int]
    target: str
    target_rows: tuple[int, int]


def _tag_pieces(converted: dict[str, torch.Tensor], row_owner: list[tuple[str, int]]) -> dict[str, list[Piece]]:
    """Turn a converter's output on row-id tagged 1-D tensors back into row pieces per source key."""
    pieces: dict[str, list[Piece]] = {}
    for target, tensor in converted.items():
        ids = tensor.to(torch.int64).tolist()
        start = 0
        while start < len(ids):
            source, first = row_owner[ids[start]]
            stop = start + 1
            while stop < len(ids) and ids[stop] == ids[stop - 1] + 1 and row_owner[ids[stop]][0] == source:
                stop += 1
            pieces.setdefault(source, []).append(Piece((first, first + stop - start), target, (start, stop)))
            start = stop
    return {k: sorted(v, key=lambda p: p.source_rows) for k, v in pieces.items()}


def _tagged(rows: dict[str, int]) -> tuple[dict[str, torch.Tensor], list[tuple[str, int]]]:
    tensors, owner = {}, []
    for key, n in rows.items():
        tensors[key] = torch.arange(len(owner), len(owner) + n, dtype=torch.float64)
        owner.extend((key, i) for i in range(n))
    return tensors, owner


def _strip_param(pieces: dict[str, list[Piece]]) -> dict[str, tuple[Piece, ...]]:
    """Keep weights only (LoRA targets): 'a.b.weight' -> module 'a.b', pieces renamed to target modules."""
    out = {}
    for key, ps in pieces.items():
        if key.endswith(".weight"):
            out[key[: -len(".weight")]] = tuple(
                Piece(p.source_rows, p.target[: -len(".weight")], p.target_rows) for p in ps
            )
    return out


@functools.lru_cache(maxsize=None)
def _flux_bfl_layout_full(num_layers: int, num_single_layers: int) -> dict[str, tuple[Piece, ...]]:
    """Layout at Flux.1's real width (diffusers' converter hardcodes 3072), validated against the model's shapes."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers as convert

    with torch.device("meta"):
        model = FluxTransformer2DModel(
            **dict(tiny_models.FULL_FLUX1_DEV_CONFIG, num_layers=num_layers, num_single_layers=num_single_layers)
        )
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    # 1. The BFL keys: whatever the converter asks for (KeyError), starting from one key per block loop and the
    #    guidance embedder (which the converter only reads when a "guidance" key is present).
    placeholder = 21504  # divisible by every chunk/split the converter makes
    keys = {f"double_blocks.{num_layers - 1}.img_mod.lin.weight", f"single_blocks.{num_single_layers - 1}.modulation.lin.weight"}
    keys.add("guidance_in.in_layer.weight")
    while True:
        checkpoint = {k: torch.zeros(placeholder) for k in keys}
        try:
            convert(checkpoint)
            break
        except KeyError as missing:
            if missing.args[0] in keys:
                raise
            keys.add(missing.args[0])
    assert not checkpoint, f"converter left keys unused: {sorted(checkpoint)}"

    # 2. Which diffusers tensors each BFL key feeds, hence its real row count.
    index = {k: i for i, k in enumerate(sorted(keys))}
    out = convert({k: torch.full((placeholder,), float(i)) for k, i in index.items()})
    feeds: dict[str, set[str]] = {}
    for target, tensor in out.items():
        for i in tensor.unique().tolist():
            feeds.setdefault(sorted(keys)[int(i)], set()).add(target)
    rows = {k: sum(shapes[t][0] for t in feeds[k]) for k in sorted(keys)}

    # 3. Row-exact pieces, then a shape check with real 2-D (meta) tensors against the diffusers model.
    tensors, owner = _tagged(rows)
    pieces = _tag_pieces(convert(dict(tensors)), owner)
    cols = {}
    for key, ps in pieces.items():
        trailing = {shapes[p.target][1:] for p in ps}
        assert len(trailing) == 1, (key, trailing)
        cols[key] = trailing.pop()
    with torch.device("meta"):
        meta_out = convert({k: torch.empty((rows[k], *cols[k])) for k in rows})
    got = {k: tuple(v.shape) for k, v in meta_out.items()}
    assert got == shapes, f"BFL layout does not reproduce the diffusers model: {sorted(set(got) ^ set(shapes))[:10]}"
    return _strip_param(pieces)


def flux_bfl_layout(model: torch.nn.Module) -> dict[str, tuple[Piece, ...]]:
    """BFL module name (``double_blocks.0.img_attn.qkv``, ``single_blocks.0.linear1``, ``final_layer.adaLN_modulation.1``,
    ...) -> row pieces in ``model`` (a FluxTransformer2DModel of any width), as diffusers' single-file converter maps
    them: qkv / linear1 split by rows, adaLN scale/shift swapped.  Modules ``model`` lacks are left out."""
    config = model.config
    full = _flux_bfl_layout_full(max(config.num_layers, 1), max(config.num_single_layers, 1))
    ref = _flux_reference_rows(max(config.num_layers, 1), max(config.num_single_layers, 1))
    params = dict(model.named_parameters())
    out = {}
    for source, ps in full.items():
        if not all(f"{p.target}.weight" in params for p in ps):
            continue
        scaled, at = [], 0
        for p in ps:  # pieces sorted by source rows; rescale each to the target module's rows in `model`
            ref_rows, rows = ref[p.target], params[f"{p.target}.weight"].shape[0]
            assert (p.target_rows[0] * rows) % ref_rows == 0 and (p.target_rows[1] * rows) % ref_rows == 0
            t0, t1 = p.target_rows[0] * rows // ref_rows, p.target_rows[1] * rows // ref_rows
            scaled.append(Piece((at, at + t1 - t0), p.target, (t0, t1)))
            at += t1 - t0
        out[source] = tuple(scaled)
    return out


@functools.lru_cache(maxsize=None)
def _flux_reference_rows(num_layers: int, num_single_layers: int) -> dict[str, int]:
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(
            **dict(tiny_models.FULL_FLUX1_DEV_CONFIG, num_layers=num_layers, num_single_layers=num_single_layers)
        )
    return {k[: -len(".weight")]: v.shape[0] for k, v in model.state_dict().items() if k.endswith(".weight")}


# SGM (ldm / sgm "openaimodel" UNet) resnet parameter names, the inverse of the replacements in
# diffusers.loaders.single_file_utils.update_unet_resnet_ldm_to_diffusers (checked by running it, below).
_SGM_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def _sgm_name(key: str, config) -> str:
    """diffusers UNet2DConditionModel parameter -> SGM parameter, for convert_ldm_unet_checkpoint to map back."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = {**DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]}
    if key in top:
        return top[key]
    per_block = config.layers_per_block + 1
    parts = key.split(".")

    def resnet(rest):
        return ".".join([_SGM_RESNET.get(rest[0], rest[0]), *rest[1:]])

    if parts[0] == "down_blocks":
        b, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":  # down_blocks.b.downsamplers.0.conv.X
            return f"input_blocks.{(b + 1) * per_block}.0.op.{parts[5]}"
        i = 1 + b * per_block + int(parts[3])
        return f"input_blocks.{i}.0.{resnet(parts[4:])}" if kind == "resnets" else f"input_blocks.{i}.1.{'.'.join(parts[4:])}"
    if parts[0] == "mid_block":
        if parts[1] == "resnets":
            return f"middle_block.{2 * int(parts[2])}.{resnet(parts[3:])}"
        return f"middle_block.1.{'.'.join(parts[3:])}"
    if parts[0] == "up_blocks":
        b, kind = int(parts[1]), parts[2]
        if kind == "upsamplers":
            slot = 2 if "CrossAttn" in config.up_block_types[b] else 1
            return f"output_blocks.{b * per_block + per_block - 1}.{slot}.conv.{parts[5]}"
        i = b * per_block + int(parts[3])
        return f"output_blocks.{i}.0.{resnet(parts[4:])}" if kind == "resnets" else f"output_blocks.{i}.1.{'.'.join(parts[4:])}"
    raise KeyError(key)


def sdxl_sgm_layout(unet: torch.nn.Module) -> dict[str, tuple[Piece, ...]]:
    """SGM module name (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``, ``middle_block.0.in_layers.2``,
    ``label_emb.0.0``, ``out.2``, ...) -> its diffusers module in ``unet`` (one piece, all rows).  The names are
    those of ``sdxl_sgm_names``, checked by diffusers' own converter."""
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    return _strip_param({sgm: [Piece((0, shapes[key][0]), key, (0, shapes[key][0]))] for key, sgm in sdxl_sgm_names(unet).items()})


def sdxl_sgm_names(unet: torch.nn.Module) -> dict[str, str]:
    """Every parameter of ``unet`` (diffusers name) -> its SGM name in a single-file checkpoint (no
    ``model.diffusion_model.`` prefix), e.g. ``down_blocks.0.resnets.0.norm1.weight`` -> ``input_blocks.1.0.in_layers.0.weight``.
    Checked by running diffusers' ``convert_ldm_unet_checkpoint`` on row-tagged tensors: it must give back exactly
    every parameter of ``unet`` with the right rows.  Works on a model built on the ``meta`` device."""
    from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint

    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    sgm = {key: _sgm_name(key, unet.config) for key in shapes}
    assert len(set(sgm.values())) == len(sgm)
    tensors, owner = _tagged({sgm[k]: shapes[k][0] for k in shapes})
    converted = convert_ldm_unet_checkpoint({LDM_UNET_KEY + k: v for k, v in tensors.items()}, dict(unet.config))
    pieces = _tag_pieces({k: v for k, v in converted.items() if v is not None}, owner)
    for key, value in sgm.items():  # every SGM tensor comes back whole, under its diffusers name
        assert pieces.get(value) == [Piece((0, shapes[key][0]), key, (0, shapes[key][0]))], (value, pieces.get(value))
    assert set(converted) == set(shapes), sorted(set(converted) ^ set(shapes))[:10]
    return sgm
