"""`lorabox card`: a Hugging Face model card (README.md with YAML front matter) for a LoRA, and
`check_repo_folder`: what the Hub and diffusers will make of a folder about to be uploaded.

The front matter follows diffusers' own training scripts (`hub_utils.load_or_create_model_card`, FIELD_NOTES §5):
`base_model`, `base_model_relation: adapter`, `library_name: diffusers`, `license` (+ `license_name`/`license_link`
when `other`), `tags`, `instance_prompt`, `widget`. The YAML is written by hand (strings double-quoted as JSON,
which YAML reads verbatim), so huggingface_hub is not needed to write a card; tests parse it with the Hub's parser.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LoraboxError, OutputError
from ..io.files import commit, discard, temporary_beside
from ..io.safetensors import read_header
from .hashes import file_hashes
from .meta import from_training_record, mine_triggers

# diffusers' preferred LoRA file names (diffusers/loaders/lora_base.py LORA_WEIGHT_NAME[_SAFE])
PREFERRED_WEIGHT_NAMES = ("pytorch_lora_weights.bin", "pytorch_lora_weights.safetensors")
NOT_WEIGHTS = ("scheduler", "optimizer", "checkpoint")  # substrings diffusers skips when guessing
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")


@dataclass(frozen=True)
class License:
    id: str
    name: str | None = None
    link: str | None = None


@dataclass(frozen=True)
class Base:
    """What a LoRA of one architecture (modelspec id) is published against."""

    repo_id: str
    tags: tuple[str, ...]
    license: License | None
    pipeline_dtype: str = "torch.bfloat16"


FLUX1_DEV_LICENSE = License("other", "flux-1-dev-non-commercial-license",
                            "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md")
BASES = {
    "stable-diffusion-v1": Base("stable-diffusion-v1-5/stable-diffusion-v1-5", ("stable-diffusion",),
                                License("creativeml-openrail-m"), "torch.float16"),
    "stable-diffusion-xl-v1-base": Base("stabilityai/stable-diffusion-xl-base-1.0", ("stable-diffusion-xl",),
                                        License("openrail++"), "torch.float16"),
    "flux-1-dev": Base("black-forest-labs/FLUX.1-dev", ("flux",), FLUX1_DEV_LICENSE),
    "flux-1-schnell": Base("black-forest-labs/FLUX.1-schnell", ("flux",), License("apache-2.0")),
    # FLUX.2: licenses differ per variant and are not pinned here; --license is required
    "flux-2-dev": Base("black-forest-labs/FLUX.2-dev", ("flux2",), None),
    "flux-2-klein-4b": Base("black-forest-labs/FLUX.2-klein-4B", ("flux2",), None),
    "flux-2-klein-9b": Base("black-forest-labs/FLUX.2-klein-9B", ("flux2",), None),
}
BASE_TAGS = ("text-to-image", "lora", "diffusers", "template:sd-lora")
# (architecture, dialect) pairs diffusers 0.42.1's load_lora_weights refuses (pinned by tests/test_diffusers_peer.py)
DIFFUSERS_CANNOT_READ = {("sd15", "comfyui"), ("sdxl", "comfyui")}


@dataclass(frozen=True)
class Finding:
    """One thing found in a repository folder: level `error` (the upload would not work as meant),
    `warning`, or `info`."""

    level: str
    code: str
    message: str

    def as_dict(self) -> dict:
        return {"level": self.level, "code": self.code, "message": self.message}


# --- the repository folder --------------------------------------------------------------------------------------

def weight_candidates(folder: str | os.PathLike, extension: str = ".safetensors") -> list[str]:
    """The files diffusers' `load_lora_weights(repo)` chooses from when no `weight_name` is given, most preferred
    first (the rule of `_best_guess_weight_name`: skip scheduler/optimizer/checkpoint, prefer
    `pytorch_lora_weights.*`). Top-level files only, as diffusers lists a local folder."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(extension))
    names = [n for n in names if not any(s in n for s in NOT_WEIGHTS)]
    for preferred in PREFERRED_WEIGHT_NAMES:
        if any(n.endswith(preferred) for n in names):
            return [n for n in names if n.endswith(preferred)]
    return names


def split_front_matter(text: str) -> tuple[str | None, str]:
    """(YAML between the leading `---` lines or None, the rest)."""
    m = re.match(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", text, re.S)
    return (m.group(1), text[m.end():]) if m else (None, text)


def _parse_yaml(text: str):
    import yaml  # PyYAML: a dependency of huggingface_hub and diffusers; the check degrades without it

    return yaml.safe_load(text)


def _stale_hashes(folder: Path, text: str, weights: list[str]) -> list[Finding]:
    """A card's hash table (as `lorabox card` writes it) that no longer matches the file: the metadata was
    edited after the card was written."""
    out = []
    for name in weights:
        listed = {h.upper() for h in re.findall(rf"\|\s*{re.escape(name)}\s*\|\s*`([0-9A-Fa-f]{{64}})`", text)}
        if listed and (actual := file_hashes(folder / name)["sha256"]) not in listed:
            out.append(Finding("warning", "stale-hash", f"README.md lists SHA256 {min(listed)} for {name}, but the "
                               f"file hashes to {actual} (changed after the card was written): run "
                               f"`lorabox card --overwrite` again."))
    return out


def _card_findings(folder: Path, weights: list[str]) -> list[Finding]:
    readme = folder / "README.md"
    if not readme.exists():
        return [Finding("error", "no-readme", "README.md is missing: the Hub shows no card, no base model, no license. "
                        "Write one with `lorabox card`.")]
    text = readme.read_text(encoding="utf-8", errors="replace")
    yaml_text, _ = split_front_matter(text)
    if yaml_text is None:
        return [Finding("error", "no-front-matter", "README.md has no YAML front matter (--- ... ---): the Hub "
                        "cannot tell the base model, license or that this is a LoRA.")]
    try:
        data = _parse_yaml(yaml_text)
    except ImportError:
        return [Finding("info", "yaml-unchecked", "PyYAML is not installed: the front matter was not parsed.")]
    except Exception as exc:  # noqa: BLE001 - any parse failure is the finding
        return [Finding("error", "bad-yaml", f"README.md front matter is not valid YAML: {exc}".splitlines()[0])]
    if not isinstance(data, dict):
        return [Finding("error", "bad-yaml", "README.md front matter is not a YAML mapping.")]
    out = _stale_hashes(folder, text, weights)
    for key in ("base_model", "license"):
        if not data.get(key):
            out.append(Finding("warning", f"no-{key.replace('_', '-')}", f"front matter has no `{key}`."))
    if data.get("license") == "other" and not (data.get("license_name") and data.get("license_link")):
        out.append(Finding("error", "license-other", "`license: other` needs `license_name` and `license_link`."))
    if data.get("library_name") not in (None, "diffusers"):
        out.append(Finding("info", "library", f"library_name is {data.get('library_name')!r}, not diffusers."))
    for entry in data.get("widget") or []:
        url = (entry.get("output") or {}).get("url") if isinstance(entry, dict) else None
        if url and not re.match(r"^[a-z]+://", url) and not (folder / url).is_file():
            out.append(Finding("error", "widget-missing", f"widget image {url} is not in the folder."))
    return out


def check_repo_folder(folder: str | os.PathLike) -> list[Finding]:
    """What the Hub and diffusers make of a folder about to be uploaded as a LoRA repository.

    Errors: no .safetensors weight file, several that diffusers would choose between (it takes the first it
    lists), pickle files (.bin/.ckpt/.pt/.pth run code when loaded), no README.md or no front matter, invalid
    YAML, `license: other` without name and link, widget images that are not in the folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise LoraboxError(f"{folder}: not a folder.", hint="Give the folder you will upload.")
    out: list[Finding] = []
    candidates = weight_candidates(folder)
    if not candidates:
        skipped = sorted(p.name for p in folder.glob("*.safetensors"))
        crash = (f" diffusers 0.42.1's load_lora_weights(repo) fails with IndexError on such a folder "
                 f"(it skipped {', '.join(skipped)})." if skipped else "")
        out.append(Finding("error", "no-weights", "no .safetensors weight file diffusers would load "
                           "(files named *scheduler*, *optimizer*, *checkpoint* are skipped)." + crash))
    elif len(candidates) > 1:
        out.append(Finding("error", "several-weights", f"{len(candidates)} weight files ({', '.join(candidates)}): "
                           f"`load_lora_weights(repo)` takes whichever is listed first. Keep one, or name the one "
                           f"to load pytorch_lora_weights.safetensors."))
    else:
        out.append(Finding("info", "weight", f"diffusers loads {candidates[0]}"))
    pickles = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                     if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES
                     and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if pickles:
        out.append(Finding("error", "pickle", f"pickle files can run code when loaded: {', '.join(pickles)}. "
                           "Publish .safetensors only."))
    return out + _card_findings(folder, candidates)


# --- writing a card -------------------------------------------------------------------------------------------

def _yaml_scalar(value) -> str:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else json.dumps(value)


def to_yaml(data: dict, indent: int = 0) -> str:
    """Block-style YAML for str/number/bool/list/dict values; every string double-quoted (JSON escapes are
    YAML escapes), so no value can be misread as another type."""
    pad = " " * indent
    lines = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:")
            lines.append(to_yaml(value, indent + 2))
        elif isinstance(value, list):
            lines.append(f"{pad}{key}:")
            for item in value:
                if isinstance(item, dict):
                    body = to_yaml(item, indent + 4).lstrip()
                    lines.append(f"{pad}  - {body}")
                else:
                    lines.append(f"{pad}  - {_yaml_scalar(item)}")
        else:
            lines.append(f"{pad}{key}: {_yaml_scalar(value)}")
    return "\n".join(lines)


@dataclass
class CardResult:
    readme: str | None
    front_matter: dict
    text: str
    findings: list[Finding] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"readme": self.readme, "front_matter": self.front_matter, "warnings": self.warnings,
                "findings": [f.as_dict() for f in self.findings]}


def _architecture(path: Path, metadata: dict[str, str], arch: str | None) -> tuple[str | None, dict, list[str]]:
    """(modelspec id, LoRA facts for the card, warnings): from the keys and shapes, else the metadata."""
    from ..conversion import load_lora
    from ..keymap import load_architecture

    try:
        lora = load_lora(path, arch=arch, drop_unknown=True)
    except LoraboxError as exc:
        stated = metadata.get("modelspec.architecture", "").split("/")[0] or None
        return stated, {}, [f"architecture not detected ({exc.message}); using the metadata's {stated}"]
    ranks = sorted({a.rank for a in lora.adapters.values() if a.rank is not None})
    facts = {"architecture": lora.architecture, "dialect": lora.dialect, "adapters": len(lora.adapters),
             "ranks": ranks}
    return load_architecture(lora.architecture).modelspec, facts, []


def _trigger(metadata: dict[str, str]) -> str | None:
    if metadata.get("modelspec.trigger_phrase"):
        return metadata["modelspec.trigger_phrase"]
    try:
        tags = json.loads(metadata.get("ss_tag_frequency", ""))
    except ValueError:
        return None
    found = mine_triggers(tags) if isinstance(tags, dict) else []
    return ", ".join(found) or None


def _body(*, title: str, description: str | None, repo_id: str, base_id: str, weight: str, trigger: str | None,
          dtype: str, hashes: dict, facts: dict) -> str:
    prompt = f"{trigger}, " if trigger else ""
    parts = [f"# {title}", ""]
    if description:
        parts += [description, ""]
    parts += [f"A LoRA for [{base_id}](https://huggingface.co/{base_id}).", ""]
    if trigger:
        parts += ["## Trigger words", "", f"Use `{trigger}` in the prompt.", ""]
    parts += [
        "## Use with diffusers", "",
        "```py",
        "import torch",
        "from diffusers import AutoPipelineForText2Image",
        "",
        f'pipe = AutoPipelineForText2Image.from_pretrained("{base_id}", torch_dtype={dtype}).to("cuda")',
        f'pipe.load_lora_weights("{repo_id}", weight_name="{weight}")',
        f'image = pipe("{prompt}a photo").images[0]',
        "```", "",
        "## Use with ComfyUI", "",
        f"Put `{weight}` in `ComfyUI/models/loras/` and load it with a **LoraLoaderModelOnly** node "
        f"(or **Load LoRA** when it also has text-encoder weights) between the model loader and the sampler.", "",
        "## File", "",
        "| file | SHA256 | AutoV2 | AutoV3 |",
        "|---|---|---|---|",
        f"| {weight} | `{hashes['sha256']}` | `{hashes['autov2']}` | `{hashes['autov3'] or '-'}` |", "",
    ]
    if facts:
        ranks = ", ".join(map(str, facts["ranks"])) or "-"
        parts += [f"Architecture `{facts['architecture']}`, {facts['adapters']} adapters, rank {ranks}, "
                  f"{facts['dialect']} key names.", ""]
    return "\n".join(parts)


def make_card(path: str | os.PathLike, repo_id: str, *, base_model: str | None = None, trigger: str | None = None,
              license: str | None = None, license_name: str | None = None, license_link: str | None = None,
              out_dir: str | os.PathLike | None = None, widget_images: list | tuple = (), arch: str | None = None,
              overwrite: bool = False, write: bool = True) -> CardResult:
    """Write `<out_dir>/README.md` (default: the LoRA's folder) for publishing `path` as `repo_id`.

    Defaults come from the file: the architecture (keys and shapes) picks the base model, its tags and its
    license (BASES); the trigger is `modelspec.trigger_phrase` or mined from `ss_tag_frequency`; the title is
    `modelspec.title`, `ss_output_name` or the file name. Widget images must lie inside `out_dir`.
    Returns the card and `check_repo_folder(out_dir)` after writing.
    Example:
        >>> make_card("my_lora.safetensors", "me/my-lora", trigger="ohwx").readme
        'README.md'
    """
    path = Path(path)
    _, metadata, _ = read_header(path)
    out_dir = Path(out_dir) if out_dir is not None else path.parent
    if not out_dir.is_dir():
        raise OutputError(f"{out_dir}: no such directory.", hint="Create it first or choose another -o.")
    readme = out_dir / "README.md"
    if write and readme.exists() and not overwrite:
        raise OutputError(f"{readme}: already exists.", hint="Pass --overwrite or choose another -o.")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise LoraboxError(f"--repo-id {repo_id}: expected OWNER/NAME.", hint="For example --repo-id me/my-flux-lora.")
    spec_id, facts, warnings = _architecture(path, metadata, arch)
    base = BASES.get(spec_id or "")
    base_id = base_model or (base.repo_id if base else None)
    if base_id is None:
        raise LoraboxError(f"{path}: no known base model for architecture {spec_id or 'unknown'}.",
                           hint="Pass --base-model OWNER/NAME.")
    lic = License(license, license_name, license_link) if license else (base.license if base else None)
    if lic is None:
        raise LoraboxError(f"{path}: no default license is known for {base_id}.",
                           hint="Pass --license (and --license-name/--license-link for `other`).")
    if lic.id == "other" and not (lic.name and lic.link):
        raise LoraboxError("--license other needs --license-name and --license-link.",
                           hint="For example --license-name my-license --license-link https://example.com/LICENSE.")
    if facts and any((facts["architecture"], d.split(" ")[0]) in DIFFUSERS_CANNOT_READ
                     for d in facts["dialect"].split(", ")):
        warnings.append(f"diffusers cannot load {facts['dialect']} key names for {facts['architecture']}, so the "
                        f"card's diffusers snippet would fail: `lorabox convert --to kohya` first.")
    trigger = trigger or _trigger(metadata)
    record = from_training_record(metadata)
    title = metadata.get("modelspec.title") or record.get("modelspec.title") or path.stem
    widgets = []
    for image in widget_images:
        image = Path(image)
        try:
            rel = image.resolve().relative_to(out_dir.resolve()).as_posix()
        except ValueError:
            raise LoraboxError(f"{image}: widget images must be inside {out_dir} (the folder you upload).",
                               hint="Copy the image there first.") from None
        if not image.is_file():
            raise LoraboxError(f"{image}: no such file.", hint="Check the widget image path.")
        widgets.append({"text": trigger or title, "output": {"url": rel}})
    front: dict = {"base_model": base_id, "base_model_relation": "adapter", "library_name": "diffusers",
                   "license": lic.id}
    if lic.id == "other":
        front |= {"license_name": lic.name, "license_link": lic.link}
    front["tags"] = list(dict.fromkeys([*BASE_TAGS, *(base.tags if base else ())]))
    if trigger:
        front["instance_prompt"] = trigger
    if widgets:
        front["widget"] = widgets
    hashes = file_hashes(path)
    body = _body(title=title, description=metadata.get("modelspec.description"), repo_id=repo_id, base_id=base_id,
                 weight=path.name, trigger=trigger, dtype=base.pipeline_dtype if base else "torch.bfloat16",
                 hashes=hashes, facts=facts)
    text = f"---\n{to_yaml(front)}\n---\n\n{body}"
    result = CardResult(None, front, text, warnings=warnings)
    if write:
        tmp = temporary_beside(readme)
        try:
            tmp.write_text(text, encoding="utf-8")
            commit(tmp, readme)
        except BaseException:
            discard(tmp)
            raise
        result.readme = str(readme)
        result.findings = check_repo_folder(out_dir)
        if not (out_dir / path.name).exists():
            result.warnings.append(f"{path.name} is not in {out_dir}: copy it there before uploading.")
    return result
