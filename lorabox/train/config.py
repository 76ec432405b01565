"""The training configuration: one frozen dataclass, per-architecture defaults as a table, TOML files.

Precedence, lowest first: `ARCH_DEFAULTS[arch]`, the base folder's own `lorabox_tiny.json` defaults (the built-in
tiny base), the `--config` TOML file, then command-line options. A field left None means "the architecture's
default", filled in by `resolve` once the base's architecture is known.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TrainingError

FORMATS = ("diffusers", "kohya", "comfyui")

# Per architecture: LoRA targets as canonical-name patterns of the key map (fnmatch; `*` crosses dots), rank and
# alpha (alpha = rank: scale 1, as diffusers' scripts, ai-toolkit and SimpleTuner write), learning rate, training
# resolution, the guidance input given to guidance-distilled bases while training (kohya, diffusion-pipe: 1.0), and
# the deployment sampler (steps, guidance) used for the sample images; max_sequence_length: T5/Mistral/Qwen tokens.
ARCH_DEFAULTS: dict[str, dict] = {
    "sd15": dict(targets=("*.attn1.to_*", "*.attn2.to_*", "*.ff.net.*"), rank=16, alpha=16.0, learning_rate=1e-4,
                 resolution=512, sample_steps=30, sample_guidance=7.5, gradient_checkpointing=True),
    "sdxl": dict(targets=("*.attn1.to_*", "*.attn2.to_*", "*.ff.net.*"), rank=16, alpha=16.0, learning_rate=1e-4,
                 resolution=1024, sample_steps=30, sample_guidance=7.0, gradient_checkpointing=True),
    "sd3": dict(targets=("joint_blocks.*.attn.*", "joint_blocks.*.attn2.*", "joint_blocks.*.mlp.*"), rank=16,
                alpha=16.0, learning_rate=1e-4, resolution=1024, sample_steps=28, sample_guidance=4.5,
                max_sequence_length=256, gradient_checkpointing=True),
    "flux1": dict(targets=("double_blocks.*_attn.*", "double_blocks.*_mlp.*", "single_blocks.*.linear1",
                           "single_blocks.*.linear2"), rank=16, alpha=16.0, learning_rate=1e-4, resolution=1024,
                  train_guidance=1.0, sample_steps=28, sample_guidance=3.5, max_sequence_length=512,
                  gradient_checkpointing=True),
    "flux2": dict(targets=("double_blocks.*_attn.*", "double_blocks.*_mlp.*", "single_blocks.*.linear1",
                           "single_blocks.*.linear2"), rank=16, alpha=16.0, learning_rate=1e-4, resolution=1024,
                  train_guidance=1.0, sample_steps=50, sample_guidance=4.0, max_sequence_length=512,
                  gradient_checkpointing=True),
}


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a run. Saved whole (as JSON) in the adapter's metadata and in OUT/config.toml."""

    data: str | None = None  # folder of images + same-named .txt captions
    base: str | None = None  # diffusers pipeline folder
    output: str = "lora-out"  # output folder: adapter, samples, checkpoints, cache, loss curve
    name: str | None = None  # adapter file name without extension (default: the output folder's name)
    format: str = "diffusers"  # dialect of the saved adapter
    trigger: str | None = None  # prepended to every caption
    denoiser_file: str | None = None  # a single-file transformer/UNet checkpoint replacing the base's
    # adapter
    rank: int | None = None
    alpha: float | None = None
    targets: tuple[str, ...] | None = None  # canonical-name patterns of the key map
    # optimisation
    steps: int = 1000
    batch_size: int = 1
    learning_rate: float | None = None
    optimizer: str = "auto"  # auto (8-bit AdamW when bitsandbytes and a GPU are there, else AdamW), adamw, adamw8bit
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # auto (bf16 on a GPU, else no), bf16, fp16, no
    gradient_checkpointing: bool | None = None
    seed: int = 42
    cpu_threads: int | None = None  # torch threads when training on a CPU (None: torch's default)
    # objective
    objective: str | None = None  # flow, epsilon, v_prediction: default (and only allowed) = the base's own
    timestep_sampling: str = "logit_normal"  # flow: logit_normal, mode, uniform
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float | None = None  # flow: override the base's shift (None: the base scheduler's, by resolution for FLUX)
    min_snr_gamma: float | None = None  # DDPM bases: min-SNR-gamma weighting (5 is the usual value)
    train_guidance: float | None = None  # guidance input of guidance-distilled bases while training
    preserve_weight: float = 0.0  # with a trigger: keep the captions without it at the base's prediction (0: off)
    # data
    resolution: int | None = None
    min_image_side: int | None = None  # smaller images are skipped and reported (default: resolution // 2)
    max_sequence_length: int | None = None
    cache_dir: str | None = None  # default OUTPUT/cache
    # run
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    eval_every: int = 100  # held-out loss at fixed timestep quantiles
    eval_quantiles: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    holdout: int = 0  # images of `data` kept out of training for the held-out loss
    eval_data: str | None = None  # a folder of held-out images + captions (default: `holdout`, else training images)
    sample_every: int = 0  # 0: samples only before and after training
    sample_prompts: tuple[str, ...] | None = None  # default: the first caption (with trigger) and one without
    sample_steps: int | None = None
    sample_guidance: float | None = None
    sample_seed: int = 0
    save_dtype: str = "bf16"  # bf16, fp16, fp32
    extra_defaults: dict = field(default_factory=dict, compare=False, repr=False)  # from the base folder

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("extra_defaults")
        return d

    def to_toml(self) -> str:
        """The resolved config as TOML (None values left out), readable back with `--config`."""
        lines = []
        for k, v in self.as_dict().items():
            if v is None:
                continue
            lines.append(f"{k} = {_toml_value(v)}")
        return "\n".join(lines) + "\n"


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "extra_defaults"}


def load_toml(path: str | Path) -> dict:
    """Read a `--config` TOML file; unknown keys are an error naming them."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TrainingError(f"{path}: cannot read the config ({exc}).") from exc
    return check_keys(data, str(path))


def check_keys(data: dict, source: str) -> dict:
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        import difflib

        near = [difflib.get_close_matches(k, FIELDS, n=1) for k in unknown]
        said = ", ".join(f"{k}" + (f" (did you mean {n[0]}?)" if n else "") for k, n in zip(unknown, near))
        raise TrainingError(f"{source}: unknown setting(s): {said}.", hint="See `lorabox train --help`.")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


def make_config(*layers: dict) -> TrainConfig:
    """A config from dicts, later layers overriding earlier ones; None in a layer means "not given"."""
    merged: dict = {}
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if v is not None})
    return TrainConfig(**check_keys(merged, "config"))


def resolve(cfg: TrainConfig, arch: str, base_defaults: dict | None = None) -> TrainConfig:
    """Fill every None from the base folder's defaults, then the architecture's table."""
    family = arch if arch in ARCH_DEFAULTS else arch.split("_")[0]
    if family not in ARCH_DEFAULTS:
        raise TrainingError(f"no training defaults for architecture {arch!r}.",
                            hint=f"Trainable: {', '.join(ARCH_DEFAULTS)}.")
    defaults = {**ARCH_DEFAULTS[family], **(base_defaults or {})}
    fill = {k: v for k, v in defaults.items() if k in FIELDS and getattr(cfg, k) is None}
    cfg = dataclasses.replace(cfg, **fill)
    if cfg.min_image_side is None:
        cfg = dataclasses.replace(cfg, min_image_side=max(8, cfg.resolution // 2))
    if cfg.cache_dir is None:
        cfg = dataclasses.replace(cfg, cache_dir=str(Path(cfg.output) / "cache"))
    if cfg.name is None:
        cfg = dataclasses.replace(cfg, name=Path(cfg.output).resolve().name)
    if cfg.format not in FORMATS:
        raise TrainingError(f"unknown format {cfg.format!r}.", hint=f"Use one of {', '.join(FORMATS)}.")
    return cfg


def describe(cfg: TrainConfig, arch: str, objective: str) -> list[str]:
    """The lines printed at the start of a run: what was chosen, defaults included."""
    return [
        f"base        {cfg.base} ({arch})",
        f"data        {cfg.data}" + (f", trigger {cfg.trigger!r}" if cfg.trigger else ""),
        f"objective   {objective}" + (f", preservation {cfg.preserve_weight:g} (captions without the trigger "
                                           f"kept at the base's prediction)" if cfg.preserve_weight and cfg.trigger
                                           else ""),
        f"adapter     LoRA rank {cfg.rank}, alpha {cfg.alpha:g}, on {', '.join(cfg.targets)}",
        f"training    {cfg.steps} steps, batch {cfg.batch_size}, lr {cfg.learning_rate:g}, {cfg.optimizer} optimizer, "
        f"resolution {cfg.resolution}, mixed precision {cfg.mixed_precision}, "
        f"gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}, seed {cfg.seed}",
        f"samples     {cfg.sample_steps} steps at guidance {cfg.sample_guidance:g}, seed {cfg.sample_seed}",
        f"output      {cfg.output}/{cfg.name}.safetensors ({cfg.format}), checkpoints every {cfg.checkpoint_every}",
    ]


# The built-in tiny base (fixtures/tiny_flux, made by scripts/make_tiny_base.py) and the run `lorabox train --minimal`
# does on it: small enough for a CPU in well under two minutes, long enough to learn the data set's concept.
TINY_BASE = "tiny_flux"
TINY_RUN = dict(cpu_threads=1, preserve_weight=4.0, steps=200, rank=8, alpha=8.0, learning_rate=4e-3, batch_size=4,
                checkpoint_every=100, eval_every=50, gradient_checkpointing=False, output="lorabox-minimal")


def fixtures_dir() -> Path:
    """fixtures/ inside the installed package, or at the top of a source checkout (as key_maps/)."""
    here = Path(__file__).resolve().parents[1]
    for candidate in (here / "fixtures", here.parent / "fixtures"):
        if (candidate / TINY_BASE / "model_index.json").is_file():
            return candidate
    raise TrainingError("the built-in tiny base is not installed (fixtures/tiny_flux).",
                        hint="Pass DATA_DIR and --base, or regenerate it with scripts/make_tiny_base.py.")


def builtin_layer() -> dict:
    """Config values for `--minimal` with neither data nor base: the tiny base, its data set and trigger."""
    root = fixtures_dir()
    base = root / TINY_BASE
    facts = json.loads((base / "lorabox_tiny.json").read_text())
    layer = dict(TINY_RUN, base=str(base), trigger=facts.get("trigger"))
    for key, field_ in (("dataset", "data"), ("validation_dataset", "eval_data")):
        if facts.get(key):
            layer[field_] = str(root.parent / facts[key]) if not Path(facts[key]).is_absolute() else facts[key]
            if not Path(layer[field_]).is_dir():  # an installed package keeps them beside the base
                layer[field_] = str(root / Path(facts[key]).name)
    return layer
