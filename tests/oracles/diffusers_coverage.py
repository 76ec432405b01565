"""Which keys of a LoRA file diffusers' own loader really uses, on the tiny pipelines of ``tiny_models``.

``diffusers_coverage(arch, path)`` runs ``Pipeline.lora_state_dict`` and ``load_lora_weights`` (diffusers 0.42.1, peft;
one tiny pipeline per architecture, its LoRA layers unloaded after each call)
and traces every module of the input through them by value: a module is loaded when a LoRA ``A`` matrix equal to its
``down`` tensor ends up in a component diffusers injects LoRA layers into (matched up to a scalar: diffusers' converters
fold alpha/rank into A and B). Everything else is dropped, whatever diffusers logs (it logs
nothing for the drops in ``diffusers_oracle.KNOWN_DIFFUSERS_BUGS``). A file the loader refuses (an exception) has
every key dropped and ``refused`` set to the error.

It is the ground truth that ``lorabox check``'s diffusers coverage model (lorabox/check/runtimes.py) is held to.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re

import torch

from . import tiny_models
from .diffusers_oracle import LORA_COMPONENTS, _Capture, _converted, _lora_modules, _read_safetensors

# what a module's `down` matrix is called in the input dialects and in diffusers' converted state dicts
_DOWN = re.compile(r"(\.lora_down\.weight|\.lora_A\.weight|\.lora\.down\.weight|\.lora_linear_layer\.down\.weight|"
                   r"\.lora_A\.default\.weight|\.down\.weight)$")
_ANY_SUFFIX = re.compile(r"(\.lora_(down|up|mid)\.weight|\.lora_[AB]\.weight|\.lora_B\.bias|\.alpha|\.dora_scale|"
                         r"\.lora_magnitude_vector(\.weight)?|\.lora(_linear_layer)?\.(down|up)\.weight|"
                         r"\.lora_[AB]\.default\.weight|\.diff|\.diff_b)$")


@dataclasses.dataclass(frozen=True)
class DiffusersCoverage:
    dropped: list[str]  # input keys diffusers does not apply, sorted
    refused: str | None  # the loader's error when it refuses the whole file


def _stem(key: str) -> str:
    return _ANY_SUFFIX.sub("", key)


def _from(a: torch.Tensor, b: torch.Tensor) -> bool:
    """A converted `a` comes from the original down `b`: equal up to a scalar, or up to a scalar to one of b's row
    blocks (a fused qkv whose B is block-diagonal is split by chunking A)."""
    if a.shape == b.shape:
        return _proportional(a, b)
    rows = a.shape[0]
    if a.shape[1:] != b.shape[1:] or rows == 0 or b.shape[0] % rows:
        return False
    return any(_proportional(a, chunk) for chunk in torch.split(b, rows))


def _proportional(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a == c * b for one scalar c != 0 (diffusers folds alpha/rank into A by powers of two, or not at all)."""
    if a.shape != b.shape:
        return False
    a, b = a.to(torch.float64).flatten(), b.to(torch.float64).flatten()
    norm = float(b @ b)
    if norm == 0:
        return False
    c = float(a @ b) / norm
    return c != 0 and torch.allclose(a, c * b, rtol=1e-2, atol=1e-6 * abs(c) * float(b.abs().max()))


def diffusers_coverage(arch: str, path: str | os.PathLike, *, wide: bool = False) -> DiffusersCoverage:
    original, _ = _read_safetensors(path)
    keys_by_stem: dict[str, list[str]] = {}
    for key in original:
        keys_by_stem.setdefault(_stem(key), []).append(key)
    downs = {_stem(k): v for k, v in original.items() if _DOWN.search(k)}

    pipe = _pipeline(arch, wide)
    try:
        return _trace(arch, pipe, path, original, keys_by_stem, downs)
    finally:
        pipe.unload_lora_weights()  # back to the bare tiny pipeline for the next call


@functools.lru_cache(maxsize=None)
def _pipeline(arch: str, wide: bool):
    return tiny_models.pipeline(arch, wide=wide)


def _trace(arch, pipe, path, original, keys_by_stem, downs) -> DiffusersCoverage:
    assert not any(_lora_modules(getattr(pipe, c)) for c in LORA_COMPONENTS[arch]), "pipeline not clean"
    with _Capture():
        try:
            converted, _alphas, _meta = _converted(arch, pipe, os.fspath(path))
            pipe.load_lora_weights(os.fspath(path))
        except (ValueError, KeyError, IndexError, RuntimeError, TypeError, NotImplementedError,
                AssertionError) as error:
            return DiffusersCoverage(sorted(original), f"{type(error).__name__}: {error}")

    loaded_components = set(LORA_COMPONENTS[arch])
    loaded_downs = []
    for key, value in converted.items():
        component = key.split(".")[0]
        if _DOWN.search(key) and component in loaded_components:
            loaded_downs.append(value)
    for component in loaded_components:  # every converted matrix of a loaded component became a peft layer
        expected = sum(1 for k in converted if k.startswith(component + ".") and _DOWN.search(k))
        injected = len(_lora_modules(getattr(pipe, component)))
        assert expected == injected, f"{component}: {expected} converted LoRA matrices, peft injected {injected}"

    dropped = []
    for stem, down in downs.items():
        hit = any(_from(v, down) for v in loaded_downs)
        if not hit:
            dropped += keys_by_stem[stem]
    return DiffusersCoverage(sorted(dropped), None)
