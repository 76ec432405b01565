"""`inspect`: what a LoRA file is, from its keys and shapes."""
from __future__ import annotations

import os
import re
from collections import Counter

from .conversion import lora_from_state_dict
from .detect import candidates, fingerprint, lora_variant, metadata_hint
from .io.safetensors import read_tensors
from .keymap import load_architecture

SHOWN_METADATA = ("modelspec.architecture", "modelspec.title", "modelspec.trigger_phrase", "ss_base_model_version",
                  "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_output_name", "lorabox.convert")


def _block(module: str) -> str:
    """The block a module belongs to, for a coverage summary: `double_blocks.3`, `input_blocks.4`, `layers.7`."""
    m = re.match(r"((?:[a-z_]+\.)*?[a-z_]*blocks?\.\d+|[a-z_.]*layers\.\d+|[a-z_]+)", module)
    return m.group(1) if m else module


def inspect_file(path: str | os.PathLike, *, arch: str | None = None) -> dict:
    """Describe a LoRA file: architecture, dialect, ranks, alphas, targets, dtypes, metadata.

    Example:
        >>> inspect_file("lora.safetensors")["architecture"]
        'flux1'
    """
    tensors, metadata = read_tensors(path)
    lora = lora_from_state_dict(tensors, metadata, arch=arch, drop_unknown=True, source=str(path))
    spec = load_architecture(lora.architecture)
    matches, mismatches = fingerprint(lora.architecture, tensors)
    components: dict[str, dict] = {}
    for a in lora.adapters.values():
        c = components.setdefault(a.component, {"adapters": 0, "blocks": Counter(), "kinds": Counter()})
        c["adapters"] += 1
        c["blocks"][_block(a.module)] += 1
        c["kinds"][a.kind] += 1
    ranks = Counter(a.rank for a in lora.adapters.values() if a.rank is not None)
    alphas = Counter(a.alpha_value for a in lora.adapters.values() if a.alpha is not None)
    ranked = candidates(tensors, metadata) if arch is None else []
    variant = lora_variant(tensors, metadata, lora.architecture)
    return {
        "file": str(path),
        "architecture": lora.architecture,
        "title": spec.title,
        "variant": variant,  # the size within the family (FLUX.2 dev / Klein 4B / 9B), when its table has variants
        "variant_title": spec.unet.table.variants[variant].title if variant else None,
        "size": "published" if matches and not mismatches else "non-standard widths" if mismatches else "unknown",
        "size_notes": mismatches[:5],
        "metadata_says": metadata_hint(metadata),
        "dialect": lora.dialect,
        "keys": len(tensors),
        "adapters": len(lora.adapters),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "alphas": {("none" if k is None else f"{k:g}"): v for k, v in sorted(alphas.items())} or {"none (scale 1)": len(lora.adapters)},
        "dtypes": dict(Counter(t.dtype for t in tensors.values())),
        "components": {name: {"adapters": c["adapters"], "kinds": dict(c["kinds"]), "blocks": dict(c["blocks"])}
                       for name, c in components.items()},
        "unknown_keys": lora.dropped,
        "other_candidates": [c.architecture for c in ranked[1:] if c.parsed == len(tensors)],
        "metadata": {k: metadata[k] for k in SHOWN_METADATA if k in metadata},
        "metadata_keys": len(metadata),
    }
