"""What `check` reports: graded findings with stable ids, one report per file, and the grade table.

Every finding id, its default grade and its remedy live in CATALOG, so the ids are a documented, stable
interface (scripts grep JSON Lines for them) and a grade is changed in one place. `--for TARGET` regrades
through FOR_TARGET: what blocks a publish to CivitAI is only advice for a local ComfyUI user.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

ERROR, WARNING, INFO = "error", "warning", "info"
GRADES = (ERROR, WARNING, INFO)
TARGETS = ("comfyui", "diffusers", "kohya", "civitai", "hf")
RUNTIMES = ("diffusers", "comfyui", "kohya")

# id -> (default grade, remedy). `unusable` ids make the file unusable input (exit 2), not a failed check.
CATALOG: dict[str, tuple[str, str]] = {
    "container.missing": (ERROR, "Check the path."),
    "container.pickle": (ERROR, "Refuse it: pickle can run code. Ask for a .safetensors file, or convert it in a sandbox you trust."),
    "container.truncated": (ERROR, "The download or copy was cut short: fetch the file again."),
    "container.header": (ERROR, "The safetensors header is corrupt: fetch the file again."),
    "container.empty": (ERROR, "The file holds no tensors: it is not a LoRA."),
    "container.not_lora": (ERROR, "Give a LoRA file, not a full checkpoint or another kind of file."),
    "container.trailing_bytes": (WARNING, "Bytes that no tensor uses: rewrite the file (lorabox convert) to drop them."),
    "arch.unknown": (ERROR, "Pass the architecture explicitly, or this LoRA is for a model lorabox has no table for."),
    "arch.detected": (INFO, ""),
    "arch.metadata_mismatch": (ERROR, "The metadata names another base model: fix the metadata or check which base this LoRA was trained on."),
    "arch.base_mismatch": (ERROR, "Use a base checkpoint of the LoRA's architecture."),
    "arch.variant_mismatch": (ERROR, "Use a base of the same variant (the widths and block counts differ)."),
    "arch.nonstandard_width": (WARNING, "The shapes do not match the published model: the LoRA is for a variant or a fine-tune with other widths."),
    "keys.unknown": (ERROR, "Remove the keys, or convert with --drop-unknown; no loader will use them."),
    "keys.duplicate": (ERROR, "Two spellings of one adapter: keep one of them (lorabox convert writes one)."),
    "dialect.mixed": (WARNING, "Rewrite the file in one dialect: lorabox convert FILE --to kohya|comfyui|diffusers."),
    "pairs.unpaired": (ERROR, "A down without its up (or the reverse) does nothing: remove it or restore the missing tensor."),
    "pairs.rank_mismatch": (ERROR, "up's columns must equal down's rows: the file was corrupted or badly merged."),
    "pairs.shape": (ERROR, "LoRA factors are [rank, in] (down) and [out, rank] (up), conv [r, in, k, k] / [out, r, 1, 1]."),
    "pairs.mixed_ranks": (INFO, ""),
    "tensors.nonfinite": (ERROR, "NaN/Inf poison every image: retrain from an earlier checkpoint or lower the learning rate."),
    "tensors.zero_up": (WARNING, "An all-zero up (lora_B) adds nothing: the module was never trained; drop it or train longer."),
    "tensors.all_zero": (ERROR, "Every up (lora_B) is zero: the LoRA changes nothing. Training never stepped, or the wrong file was saved."),
    "alpha.missing": (WARNING, "Without .alpha the scale is 1, and tools that fill a missing alpha with 1.0 make it 1/rank as strong: write alpha (lorabox convert --to kohya)."),
    "alpha.zero": (ERROR, "alpha 0 disables the module in ComfyUI but kohya reads it as alpha = rank: set alpha to the value trained with."),
    "alpha.negative": (ERROR, "A negative alpha flips the update: set alpha to the value trained with."),
    "alpha.metadata_only": (WARNING, "ComfyUI and kohya ignore lora_adapter_metadata: fold alpha into the weights (lorabox convert --to diffusers) or write kohya with .alpha."),
    "alpha.stray": (INFO, ""),
    "dtype.fp8": (WARNING, "fp8 factors lose most of a small update's precision and not every loader casts them: save LoRAs in bf16/fp16."),
    "dtype.fp32": (INFO, "fp32 doubles the size for no visible gain: bf16/fp16 is the norm for LoRAs."),
    "dtype.mixed": (INFO, "Mixed dtypes are legal, but one dtype is cheaper for every loader."),
    "dtype.non_float": (ERROR, "LoRA factors must be floating point."),
    "size.summary": (INFO, ""),
    "size.extra_tensors": (WARNING, "Check what the big tensors are: a LoRA should be rank x (in + out) per module; full "
                                    "deltas (.diff) or extracted full weights make it a fine-tune in disguise."),
    "coverage.diffusers_drops": (WARNING, "diffusers will not apply these keys: convert to a spelling it reads (lorabox convert --to diffusers)."),
    "coverage.diffusers_refuses": (WARNING, "diffusers has no reader for this spelling: lorabox convert --to diffusers (or kohya)."),
    "coverage.comfyui_drops": (WARNING, "ComfyUI logs 'lora key not loaded' for these: lorabox convert --to comfyui."),
    "coverage.kohya_drops": (WARNING, "sd-scripts names its modules differently: lorabox convert --to kohya."),
    "coverage.unmodelled": (INFO, "lorabox has no tested model of this runtime for this spelling; convert to a dialect it reads to be sure."),
    "coverage.base_missing": (ERROR, "These adapters target weights the base does not have: wrong base, or a LoRA for another variant."),
    "meta.modelspec": (INFO, "Add modelspec.* (sai_model_spec, architecture, implementation, title): hubs and UIs read them."),
    "meta.kohya": (INFO, "ss_network_dim/ss_network_alpha/ss_base_model_version tell tools how the LoRA was trained."),
    "meta.trigger": (INFO, "Record the trigger word (modelspec.trigger_phrase) so users and hubs can find it."),
    "meta.private": (WARNING, "Strip them before sharing: paths and folder names give away user names and data sets."),
    "meta.hashes": (INFO, ""),
    "check.crashed": (ERROR, "A bug in lorabox, not in the file: please report it with `lorabox inspect FILE --json`."),
}

UNUSABLE = {"container.missing", "container.pickle", "container.truncated", "container.header", "container.empty",
            "container.not_lora", "arch.unknown"}

# how a publishing or runtime target regrades ids (ids not listed keep their default grade)
FOR_TARGET: dict[str, dict[str, str]] = {
    "civitai": {"meta.private": ERROR, "meta.modelspec": WARNING, "meta.trigger": WARNING, "meta.kohya": INFO},
    "hf": {"meta.private": ERROR, "meta.modelspec": WARNING, "meta.trigger": WARNING},
    "diffusers": {"coverage.diffusers_drops": ERROR, "coverage.diffusers_refuses": ERROR, "alpha.missing": INFO},
    "comfyui": {"coverage.comfyui_drops": ERROR, "alpha.metadata_only": ERROR},
    "kohya": {"coverage.kohya_drops": ERROR, "alpha.metadata_only": ERROR},
}


def grade_of(finding_id: str, target: str | None) -> str:
    default = CATALOG[finding_id][0]
    return FOR_TARGET.get(target or "", {}).get(finding_id, default)


@dataclass
class Finding:
    id: str
    grade: str
    file: str
    message: str
    remedy: str = ""
    keys: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class FileReport:
    file: str
    findings: list[Finding] = field(default_factory=list)
    architecture: str | None = None
    dialect: str | None = None

    @property
    def unusable(self) -> bool:
        return any(f.id in UNUSABLE and f.grade == ERROR for f in self.findings)

    def failed(self, strict: bool = False) -> bool:
        blocking = (ERROR, WARNING) if strict else (ERROR,)
        return any(f.grade in blocking for f in self.findings)

    def exit_code(self, strict: bool = False) -> int:
        return 2 if self.unusable else 1 if self.failed(strict) else 0

    def ids(self, grade: str | None = None) -> set[str]:
        return {f.id for f in self.findings if grade is None or f.grade == grade}
