"""`lorabox meta`: read and rewrite a LoRA's header metadata, and fill Stability-AI ModelSpec 1.0.1 and kohya's
`ss_network_*` keys from what the file itself proves (architecture, ranks, alphas) or from a training record.

Only the header changes: the tensor bytes are copied verbatim, so AutoV3, `sshs_model_hash` and
`modelspec.hash_sha256` stay valid while SHA256/AutoV2 change (they cover the header too).

Order of edits: the file's metadata -> `strip_private` -> fields from the training record (`from_training`,
missing keys only) -> fields derived from the tensors (missing keys only) -> `--set`/`--unset` (always win)
-> `modelspec.hash_sha256` recomputed from the tensor bytes.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ..errors import LoraboxError
from ..io.safetensors import check_output, read_header, rewrite_metadata, same_file
from .hashes import file_hashes, tensor_data_sha256
from .privacy import strip_private

MODELSPEC_VERSION = "1.0.1"
SGM = "https://github.com/Stability-AI/generative-models"
# modelspec.implementation by the architecture id's family (FIELD_NOTES §5; kohya's sai_model_spec.py)
IMPLEMENTATIONS = (
    ("stable-diffusion-xl", SGM),
    ("flux-1", "https://github.com/black-forest-labs/flux"),
    ("flux-2", "https://github.com/black-forest-labs/flux2"),
)
DEFAULT_IMPLEMENTATION = "diffusers"

# what lorabox writes for ss_base_model_version, by modelspec id: kohya's spelling where kohya has one, else
# ai-toolkit's (reading goes through detect.METADATA_HINTS, which knows every spelling)
SS_BASE_MODEL_VERSION = {"stable-diffusion-v1": "sd_v1", "stable-diffusion-xl-v1-base": "sdxl_base_v1-0",
                         "flux-1-dev": "flux1", "flux-2-dev": "flux2", "flux-2-klein-4b": "flux2_klein_4b",
                         "flux-2-klein-9b": "flux2_klein_9b"}
# kohya's ss_network_module per adapter kind
NETWORK_MODULES = {"lora": "networks.lora", "loha": "lycoris.kohya", "lokr": "lycoris.kohya"}

MODELSPEC_KEYS = frozenset(f"modelspec.{k}" for k in (
    "sai_model_spec", "architecture", "implementation", "title", "description", "author", "date", "hash_sha256",
    "implementation_version", "license", "usage_hint", "category", "thumbnail", "merged_from", "tags",
    "resolution", "trigger_phrase", "prediction_type", "timestep_range", "encoder_layer", "preprocessor",
    "is_negative_embedding", "unet_dtype", "vae_dtype"))
MODELSPEC_MUST = ("modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title")
KNOWN_PREFIXES = ("modelspec.", "ss_", "sshs_", "lorabox.")
KNOWN_KEYS = frozenset({"format", "lora_adapter_metadata", "training_info", "software", "version", "name"})


def implementation_for(architecture_id: str) -> str:
    return next((impl for prefix, impl in IMPLEMENTATIONS if architecture_id.startswith(prefix)),
                DEFAULT_IMPLEMENTATION)


def parse_assignment(text: str) -> tuple[str, str]:
    """`KEY=VALUE` from `--set` (the value may contain `=`)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise LoraboxError(f"--set {text}: expected KEY=VALUE.", hint="For example --set modelspec.title='My LoRA'.")
    return key.strip(), value


def namespace_warnings(keys) -> list[str]:
    """Keys set by hand that no tool reads: not modelspec./ss_/sshs_/lorabox. and not a known key, or a
    modelspec.* key the spec does not define (often a typo)."""
    out = []
    for key in keys:
        if key.startswith("modelspec.") and key not in MODELSPEC_KEYS:
            out.append(f"{key}: not a ModelSpec 1.0.1 key (known: title, description, author, trigger_phrase, ...)")
        elif not key.startswith(KNOWN_PREFIXES) and key not in KNOWN_KEYS:
            out.append(f"{key}: not in a known namespace (modelspec., ss_, sshs_, lorabox.); written as given")
    return out


# --- fields from a training record ---------------------------------------------------------------------------

def _json(metadata: dict[str, str], key: str):
    try:
        return json.loads(metadata.get(key, ""))
    except ValueError:
        return None


def mine_triggers(tag_frequency: dict) -> list[str]:
    """Trigger words from kohya/ai-toolkit's `ss_tag_frequency` ({folder: {tag: count}}).

    A folder is named `<repeats>_<instance and class tokens>`: the whole name when it is a tag (ai-toolkit
    writes `{"1_<trigger>": {"<trigger>": 1}}`, kohya without captions), else its first word that is a tag
    (kohya with captions: folder `10_ohwx woman`, tags `ohwx`, `woman`, ...)."""
    found: list[str] = []
    for folder, tags in tag_frequency.items():
        if not isinstance(tags, dict):
            continue
        name = re.sub(r"^\d+_", "", str(folder)).strip()
        words = [name] + name.split()
        hit = next((w for w in words if w in tags), None)
        if hit and hit not in found:
            found.append(hit)
    return found


def _resolution(text: str) -> str | None:
    nums = re.findall(r"\d+", text)
    if len(nums) == 1:
        return f"{nums[0]}x{nums[0]}"
    return f"{nums[0]}x{nums[1]}" if len(nums) >= 2 else None


def _iso_date(timestamp: str) -> str | None:
    try:
        return datetime.fromtimestamp(float(timestamp), tz=timezone.utc).isoformat(timespec="seconds")
    except (ValueError, OverflowError, OSError):
        return None


def from_training_record(metadata: dict[str, str]) -> dict[str, str]:
    """modelspec fields a kohya/ai-toolkit training record (ss_*) already holds: title (ss_output_name, `name`),
    date (ss_training_started_at), trigger_phrase (ss_tag_frequency), resolution, prediction_type, description."""
    out: dict[str, str] = {}
    title = metadata.get("ss_output_name") or metadata.get("name")  # kohya's run name, ai-toolkit's job name
    if title:
        out["modelspec.title"] = title
    if (date := _iso_date(metadata.get("ss_training_started_at", ""))) is not None:
        out["modelspec.date"] = date
    tags = _json(metadata, "ss_tag_frequency")
    if isinstance(tags, dict) and (triggers := mine_triggers(tags)):
        out["modelspec.trigger_phrase"] = ", ".join(triggers)
    resolution = metadata.get("ss_resolution")
    datasets = _json(metadata, "ss_datasets")
    if not resolution and isinstance(datasets, list) and datasets and isinstance(datasets[0], dict):
        resolution = str(datasets[0].get("resolution", ""))
    if resolution and (res := _resolution(resolution)):
        out["modelspec.resolution"] = res
    if metadata.get("ss_v_parameterization") == "True":
        out["modelspec.prediction_type"] = "v"
    comment = metadata.get("ss_training_comment", "")
    if comment and comment != "None":
        out["modelspec.description"] = comment
    return out


# --- fields from the tensors ----------------------------------------------------------------------------------

def from_tensors(path: str | os.PathLike, metadata: dict[str, str], *, arch: str | None = None,
                 title: str | None = None, now: datetime | None = None) -> tuple[dict[str, str], list[str]]:
    """(fields the file's tensors prove, warnings): modelspec MUST keys, date, and kohya's ss_network_dim /
    ss_network_alpha / ss_network_module / ss_base_model_version. A file lorabox cannot read as a LoRA gets
    only the architecture-free keys, and a warning."""
    from ..conversion import load_lora
    from ..detect import metadata_hint
    from ..keymap import load_architecture

    out: dict[str, str] = {"modelspec.sai_model_spec": MODELSPEC_VERSION,
                           "modelspec.title": title or Path(path).stem,
                           "modelspec.date": (now or datetime.now(timezone.utc)).isoformat(timespec="seconds")}
    warnings: list[str] = []
    try:
        lora = load_lora(path, arch=arch, drop_unknown=True)
    except LoraboxError as exc:
        warnings.append(f"architecture not derived ({exc.message})")
        return out, warnings
    spec_id = load_architecture(lora.architecture).modelspec
    if spec_id:
        out["modelspec.architecture"] = f"{spec_id}/lora"
        out["modelspec.implementation"] = implementation_for(spec_id)
    if spec_id in SS_BASE_MODEL_VERSION:
        out["ss_base_model_version"] = SS_BASE_MODEL_VERSION[spec_id]
    for key in ("modelspec.architecture", "ss_base_model_version"):
        stated = metadata.get(key)
        if stated and metadata_hint({key: stated}) != lora.architecture:
            warnings.append(f"{key} says {stated}, the keys and shapes say {lora.architecture} ({out.get(key)})")
    adapters = [a for a in lora.adapters.values() if a.rank is not None]
    ranks = Counter(a.rank for a in adapters)
    alphas = Counter(a.rank if a.alpha is None else a.alpha_value for a in adapters)
    kinds = Counter(a.kind for a in adapters)
    if len(ranks) == 1:
        out["ss_network_dim"] = str(next(iter(ranks)))
    elif ranks:
        out["ss_network_dim"] = "Dynamic"   # what kohya's resize_lora writes for varying ranks
    if len(alphas) == 1:
        out["ss_network_alpha"] = str(float(next(iter(alphas))))
    elif alphas:
        out["ss_network_alpha"] = "Dynamic"
    if len(kinds) == 1 and next(iter(kinds)) in NETWORK_MODULES:
        out["ss_network_module"] = NETWORK_MODULES[next(iter(kinds))]
    return out, warnings


# --- the command ----------------------------------------------------------------------------------------------

@dataclass
class MetaResult:
    file: str
    output: str | None
    metadata: dict[str, str]
    changes: list[dict] = field(default_factory=list)
    private: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    hashes: dict | None = None

    def as_dict(self) -> dict:
        return {"file": self.file, "output": self.output, "written": self.output is not None,
                "changes": self.changes, "private_removed": self.private, "warnings": self.warnings,
                "hashes": self.hashes, "metadata": self.metadata}


def _fill(metadata: dict[str, str], fields: dict[str, str]) -> None:
    for k, v in fields.items():
        if not metadata.get(k):
            metadata[k] = v


def edit_metadata(path: str | os.PathLike, *, sets: list[str] | tuple = (), unset: list[str] | tuple = (),
                  strip: bool = False, from_training: bool = False, fill: bool = True,
                  output: str | os.PathLike | None = None, overwrite: bool = False, write: bool = True,
                  arch: str | None = None, now: datetime | None = None,
                  progress: Callable[[int, int], None] | None = None) -> MetaResult:
    """Rewrite a safetensors file's header metadata (see the module docstring for the order of edits).

    Args:
        path: the .safetensors file.
        sets: `KEY=VALUE` strings; any key is allowed (strings only), unknown namespaces give a warning.
        unset: keys to remove.
        strip: redact private details (`privacy.strip_private`).
        from_training: fill modelspec fields from a kohya/ai-toolkit training record in the metadata.
        fill: fill missing modelspec MUST/SHOULD and ss_network_* keys from the tensors.
        output: where to write; None replaces `path` in place (atomically; the tensor bytes are copied verbatim).
        overwrite: allow replacing an existing `output` (never another input).
        write: False computes the result without writing anything.
    Returns:
        MetaResult (the new metadata, each change, what was redacted, warnings, hashes of the written file).
    Example:
        >>> edit_metadata("lora.safetensors", sets=["modelspec.trigger_phrase=ohwx"], output="out.safetensors")
    """
    path = Path(path)
    assignments = [parse_assignment(s) for s in sets]
    _, before, _ = read_header(path)
    out_path = path if output is None else Path(output)
    if write and output is not None and not same_file(out_path, path):
        check_output(out_path, [path], overwrite=overwrite)
    metadata = dict(before)
    private = []
    if strip:
        metadata, items = strip_private(metadata)
        private = [i.as_dict() for i in items]
    warnings: list[str] = []
    if from_training:
        _fill(metadata, from_training_record(metadata))
    if fill:
        derived, notes = from_tensors(path, metadata, arch=arch, now=now)
        warnings += notes
        _fill(metadata, derived)
    for key, value in assignments:
        metadata[key] = value
    for key in unset:
        metadata.pop(key, None)
    warnings += namespace_warnings([k for k, _ in assignments])
    if fill or "modelspec.hash_sha256" in before:
        digest = "0x" + tensor_data_sha256(path)
        stated = dict(assignments).get("modelspec.hash_sha256")
        if stated is not None and stated.lower() != digest:
            warnings.append(f"modelspec.hash_sha256 set to {stated}, but the tensor bytes hash to {digest}")
        elif "modelspec.hash_sha256" not in unset:
            metadata["modelspec.hash_sha256"] = digest
    if fill:
        missing = [k for k in MODELSPEC_MUST if not metadata.get(k)]
        if missing:
            warnings.append(f"ModelSpec MUST keys still missing: {', '.join(missing)} (use --set or --arch)")
    changes = [{"key": k, "old": before.get(k), "new": metadata.get(k)}
               for k in dict.fromkeys([*before, *metadata]) if before.get(k) != metadata.get(k)]
    result = MetaResult(str(path), None, metadata, changes, private, warnings)
    if write:
        rewrite_metadata(path, out_path, metadata, progress=progress)
        result.output = str(out_path)
        h = file_hashes(out_path)
        result.hashes = {k: h[k] for k in ("sha256", "autov2", "autov3", "sshs_model_hash")}
    return result


def show_metadata(path: str | os.PathLike) -> dict:
    """The header metadata as it is, with the ModelSpec MUST keys it lacks (nothing is written)."""
    _, metadata, _ = read_header(path)
    return {"file": str(path), "metadata": metadata,
            "modelspec_missing": [k for k in MODELSPEC_MUST if not metadata.get(k)]}
