"""`train`: one LoRA training run, top to bottom.

resolve config -> check data -> load base -> cache latents and embeddings -> add LoRA (peft) -> loop (draw,
predict, loss, step; checkpoints; held-out loss) -> samples with and without the adapter -> save in the chosen
dialect. Device, mixed precision and several GPUs or machines come from accelerate (`accelerate launch -m lorabox
train ...`). The library never prints: `progress(event: dict)` receives what the CLI shows.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import TrainingDiverged, TrainingError
from . import data as data_mod
from . import models, objectives
from .config import TrainConfig, describe, resolve
from .sample import loss_curve, sample_images
from .save import SAVE_DTYPES, metadata, peft_state_dict, save_adapter, to_lora

CHECKPOINTS = "checkpoints"
BASE_DEFAULTS_FILE = "lorabox_tiny.json"  # training defaults a base folder may carry (the built-in tiny base does)


@dataclass
class TrainResult:
    adapter: str
    architecture: str
    steps: int
    losses: list[float]
    evals: list[dict]
    samples: list[dict]
    skipped: list[tuple[str, str]]
    seconds: float
    config: dict = field(default_factory=dict)
    main_process: bool = True  # under accelerate, only the main process writes and reports

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def train(cfg: TrainConfig, *, resume: bool = False, progress=None) -> TrainResult:
    """Train a LoRA on `cfg.data` over `cfg.base` and save it to `cfg.output`.

    Example:
        >>> train(TrainConfig(data="photos/", base="FLUX.1-dev/", output="out/", trigger="sks"))
    """
    threads, cudnn_attention = torch.get_num_threads(), torch.backends.cuda.cudnn_sdp_enabled()
    if cfg.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(cfg.cpu_threads)  # tiny models on a busy CPU: more threads only spin against each other
    # cuDNN's attention backward (torch's default SDPA backend on Hopper since 2.11) returns NaN gradients or
    # faults on some shapes when a mask is passed (pytorch/pytorch#196678; measured here on an H100 with torch
    # 2.11 + cuDNN 9.19: NaN LoRA weights after the first step of a bf16 FLUX run). Flash and memory-efficient
    # attention, the next backends in torch's order, give finite gradients on the same run.
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        return _train(cfg, resume=resume, progress=progress)
    finally:
        torch.set_num_threads(threads)
        torch.backends.cuda.enable_cudnn_sdp(cudnn_attention)


def _train(cfg: TrainConfig, *, resume: bool, progress) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    emit = progress or (lambda event: None)
    t0 = time.time()
    if not cfg.base:
        raise TrainingError("no base given.", hint="Pass --base FOLDER (a diffusers pipeline folder).")
    if not cfg.data:
        raise TrainingError("no training data given.", hint="Pass DATA_DIR, a folder of images with .txt captions.")
    arch = models.architecture_of(cfg.base)
    cfg = resolve(cfg, arch, _base_defaults(cfg.base))
    objective = models.make_objective(cfg, cfg.base)  # refuses an objective the base was not trained with
    keymap = _keymap(arch)
    dataset = data_mod.scan(cfg.data, trigger=cfg.trigger, min_side=cfg.min_image_side)
    eval_set = data_mod.scan(cfg.eval_data, trigger=cfg.trigger, min_side=cfg.min_image_side) if cfg.eval_data else None
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    state = _find_checkpoint(out) if resume else None
    if resume and state is None:
        raise TrainingError(f"{out}: no checkpoint to resume from.", hint="Run without --resume to start afresh.")

    on_gpu = torch.cuda.is_available()
    mp = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if on_gpu else "no")
    optimizer_name = _optimizer_name(cfg.optimizer, on_gpu)
    cfg = dataclasses.replace(cfg, mixed_precision=mp, optimizer=optimizer_name)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # a second run in one process may use another precision (the process group stays)
    accelerator = Accelerator(mixed_precision=mp)
    device = accelerator.device
    if not accelerator.is_main_process:
        emit = lambda event: None  # noqa: E731 - one process reports
    emit({"event": "start", "lines": describe(cfg, arch, objective.describe()) + _skipped_lines(dataset)})
    set_seed(cfg.seed)

    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp, torch.float32)
    family = models.load_base(cfg, arch, weight_dtype)
    pipe = family.pipe
    for ds in (dataset, eval_set):
        if ds is not None:
            data_mod.assign_buckets(ds, cfg.resolution, family.pixel_multiple)
    pipe.to(device)

    # 1. cache latents and text embeddings (main process first, so the others read the cache)
    cache = data_mod.Cache(cfg.cache_dir, models.base_id(cfg.base))
    prompts = list(cfg.sample_prompts if cfg.sample_prompts is not None else _default_prompts(dataset, cfg.trigger))
    with accelerator.main_process_first():
        latents = [_latent(family, cache, item, device) for item in dataset.items]
        held = [(_latent(family, cache, item, device), item.caption) for item in (eval_set.items if eval_set else [])]
        preserve = bool(cfg.preserve_weight and cfg.trigger)
        plains = {item.plain_caption for item in dataset.items} if preserve else set()
        captions = sorted({item.caption for item in dataset.items} | {c for _, c in held} | set(prompts) | {""}
                          | plains)
        embeds = {c: _embedding(family, cache, c, device, cfg.max_sequence_length) for c in captions}
    emit({"event": "note", "text": f"cache: {cache.hits} reused, {cache.misses} computed ({cfg.cache_dir})"})
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:
            setattr(pipe, name, None)  # embeddings are cached; free the encoders' memory
    train_idx, eval_idx = _split(len(dataset.items), cfg.holdout)
    held = held or [(latents[i], dataset.items[i].caption) for i in (eval_idx or train_idx[:4])]
    held_out = bool(eval_set or eval_idx)

    # 2. the adapter
    model = getattr(pipe, family.denoiser)
    targets = lora_targets(model, keymap, cfg.targets)
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=targets,
                                 init_lora_weights="gaussian"))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # trainable LoRA weights in float32; the frozen base stays in weight_dtype
    if cfg.gradient_checkpointing and getattr(model, "_supports_gradient_checkpointing", False):
        model.enable_gradient_checkpointing()
    optimizer = _optimizer(optimizer_name, params, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    plain = accelerator.unwrap_model(model)

    start, losses, evals = 0, [], []
    if state is not None:
        start, losses, evals = _load_checkpoint(state, plain, optimizer, cfg)
        emit({"event": "note", "text": f"resumed from {state} (step {start})"})

    # 3. the loop
    last_good = state

    def evaluate(done: int) -> None:
        evals.append({"step": done, "held_out": held_out,
                      **_eval_loss(family, model, objective, held, embeds, cfg, device, weight_dtype, accelerator)})
        emit({"event": "eval", **evals[-1]})

    if cfg.eval_every and start == 0:
        evaluate(0)  # the base's own loss: what the held-out curve starts from
    model.train()
    emit({"event": "begin", "start": start, "total": cfg.steps})
    for step in range(start, cfg.steps):
        batch = _batch(dataset, train_idx, cfg, step, accelerator.process_index)
        x0 = torch.stack([latents[i] for i in batch]).to(device)  # float32: noising and targets stay exact
        cond = _stack(embeds, [dataset.items[i].caption for i in batch], family, device, weight_dtype)
        pcond = _stack(embeds, [dataset.items[i].plain_caption for i in batch], family, device, weight_dtype) \
            if preserve else None
        gen = torch.Generator("cpu").manual_seed(cfg.seed * 1_000_003 + step * 101 + accelerator.process_index)
        loss, main = _step_loss(family, model, plain, objective, x0, cond, pcond, cfg, gen, accelerator)
        value = accelerator.gather(main.detach()).mean().item()
        total = accelerator.gather(loss.detach()).mean().item()  # = value without preservation
        if not (math.isfinite(value) and math.isfinite(total)):
            _write_log(out, cfg, losses, evals)
            raise _diverged(value if not math.isfinite(value) else total, step + 1, last_good, cfg)
        accelerator.backward(loss)
        if cfg.max_grad_norm and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(value)
        done = step + 1
        emit({"event": "step", "step": done, "total": cfg.steps, "loss": value})
        if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
            evaluate(done)
        if cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                last_good = _save_checkpoint(out, plain, optimizer, done, losses, evals, cfg)
                emit({"event": "note", "text": f"checkpoint {last_good}"})
    model.eval()

    # 4. samples, curve, adapter
    accelerator.wait_for_everyone()
    samples, report = [], {}
    adapter_path = out / f"{cfg.name}.safetensors"
    if accelerator.is_main_process:
        size = dataset.items[0].bucket
        samples = sample_images(family, plain, prompts, embeds, embeds[""], cfg=cfg, size=size,
                                folder=out / "samples", device=device, dtype=weight_dtype)
        curve = [(e["step"], e["loss"]) for e in evals]
        loss_curve(losses, curve, out / "loss.png")
        lora = to_lora(peft_state_dict(plain), arch=keymap, prefix=_component_prefix(keymap), rank=cfg.rank,
                       alpha=cfg.alpha, dtype=SAVE_DTYPES[cfg.save_dtype])
        meta = metadata(cfg, arch=keymap, steps=len(losses), objective=objective.kind,
                        extra={"final_loss": _mean_tail(losses), "held_out": evals[-1] if evals else None})
        report = save_adapter(lora, adapter_path, fmt=cfg.format, meta=meta)
        (out / "config.toml").write_text(cfg.to_toml())
        _write_log(out, cfg, losses, evals)
        emit({"event": "saved", "report": report})
    return TrainResult(str(adapter_path), arch, len(losses), losses, evals, samples, dataset.skipped,
                       time.time() - t0, cfg.as_dict(), accelerator.is_main_process)


# --- pieces ---------------------------------------------------------------------------------------------------

def _diverged(value: float, step: int, last_good, cfg) -> TrainingDiverged:
    kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written before it"
    return TrainingDiverged(f"the loss became {value} at step {step}; training stopped and {kept} "
                            f"(nothing after it was saved).",
                            hint=f"Lower the learning rate (now {cfg.learning_rate:g}) and run again"
                                 + (" with --resume." if last_good else "."))


def _stack(embeds: dict, captions: list[str], family, device, dtype) -> dict:
    return {k: torch.stack([embeds[c][k] for c in captions]).to(device, dtype) for k in family.prompt_outputs}


def _step_loss(family, model, plain, objective, x0, cond, pcond, cfg, gen, accelerator):
    """(loss to minimise, objective loss). With preservation (`pcond`: the captions without the trigger) the
    adapter's prediction for the plain captions is also pulled to the base's own (adapter off) at the same noisy
    input, so what the trigger does not name stays as the base made it (ai-toolkit's differential output
    preservation); both captions go through the model as one batch."""
    device, dtype = x0.device, next(iter(cond.values())).dtype  # the model's input dtype (the base's weights)
    noise = torch.randn(x0.shape, generator=gen).to(device, x0.dtype)
    d = objectives.draw(objective, x0, noise, seq_len=family.seq_len(x0.shape), generator=gen)
    t, noisy = d.timestep.to(device), d.noisy.to(dtype)
    if pcond is None:
        with accelerator.autocast():
            pred = family.predict(model, noisy, t, cond, cfg.train_guidance)
        main = objectives.loss(pred, d.target, d.weight.to(device))
        return main, main
    with torch.no_grad(), accelerator.autocast():
        plain.disable_adapters()
        prior = family.predict(plain, noisy, t, pcond, cfg.train_guidance)
        plain.enable_adapters()
    both = {k: torch.cat([cond[k], pcond[k]]) for k in cond}
    with accelerator.autocast():
        pred = family.predict(model, torch.cat([noisy, noisy]), torch.cat([t, t]), both, cfg.train_guidance)
    n = x0.shape[0]
    main = objectives.loss(pred[:n], d.target, d.weight.to(device))
    return main + cfg.preserve_weight * objectives.loss(pred[n:], prior), main


def lora_targets(model, keymap: str, patterns) -> list[str]:
    """The model's Linear layers that the key map names and whose canonical name matches a pattern.

    Targets come from the tables, so every trained module has a canonical name and every dialect can spell it.
    """
    from ..keymap import load_architecture

    table = load_architecture(keymap).unet.table
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    out = []
    for module in table.modules.values():
        if any(fnmatch.fnmatchcase(module.canonical, p) for p in patterns):
            out += [d for d in module.diffusers if d in linears]
    if not out:
        raise TrainingError(f"no layer of the {keymap} denoiser matches the targets {', '.join(patterns)}.",
                            hint="Targets are canonical module names of key_maps/" + keymap + ".toml (fnmatch).")
    return sorted(set(out))


def _keymap(arch: str) -> str:
    from ..keymap import architecture_names

    if arch not in architecture_names():
        raise TrainingError(f"no key map for {arch} in this install: lorabox cannot name or save its LoRA layers.",
                            hint=f"Trainable with the installed key maps: {', '.join(architecture_names())}.")
    return arch


def _component_prefix(keymap: str) -> str:
    from ..keymap import load_architecture

    return load_architecture(keymap).unet.prefixes["diffusers"]


# lorabox_tiny.json (written with the built-in tiny base) -> config fields
BASE_FACTS = {"resolution": "resolution", "num_inference_steps": "sample_steps", "guidance_scale": "sample_guidance",
              "max_sequence_length": "max_sequence_length"}


def base_facts(base: str | Path) -> dict:
    path = Path(base) / BASE_DEFAULTS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _base_defaults(base: str) -> dict:
    """Training defaults carried by the base folder (the tiny base's resolution, sampler, prompt length)."""
    facts = base_facts(base)
    out = {field_: facts[key] for key, field_ in BASE_FACTS.items() if key in facts}
    out.update(facts.get("train_defaults", {}))
    return out


def _optimizer_name(name: str, on_gpu: bool) -> str:
    if name == "auto":
        return "adamw8bit" if on_gpu and _has_bnb() else "adamw"
    if name == "adamw8bit" and not _has_bnb():
        raise TrainingError("--optimizer adamw8bit needs bitsandbytes, which is not installed.",
                            hint="pip install bitsandbytes, or use --optimizer adamw.")
    if name not in ("adamw", "adamw8bit"):
        raise TrainingError(f"unknown optimizer {name!r}.", hint="Use auto, adamw or adamw8bit.")
    return name


def _has_bnb() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install is as good as none
        return False
    return True


def _optimizer(name: str, params, cfg):
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def _skipped_lines(dataset) -> list[str]:
    lines = [f"images      {len(dataset.items)} usable, {len(dataset.skipped)} skipped"]
    lines += [f"  skipped   {name}: {why}" for name, why in dataset.skipped]
    return lines


def _default_prompts(dataset, trigger: str | None) -> list[str]:
    """The first caption (with the trigger) and, with a trigger, the same caption without it."""
    first = dataset.items[0]
    return [first.caption, first.plain_caption or "a photo"] if trigger else [first.caption]


def _split(n: int, holdout: int) -> tuple[list[int], list[int]]:
    if holdout and holdout >= n:
        raise TrainingError(f"holdout {holdout} leaves no training image (the folder has {n}).",
                            hint="Lower --holdout.")
    return list(range(n - holdout)), list(range(n - holdout, n))


def _batch(dataset, train_idx: list[int], cfg, step: int, rank: int) -> list[int]:
    """The batch of `step`: one bucket (drawn in proportion to its images), images drawn from it; a function of
    (seed, step, process) alone, so a resumed run sees the batches the uninterrupted one would have."""
    rng = random.Random(f"{cfg.seed}:{step}:{rank}")
    allowed = set(train_idx)
    buckets = [[i for i in idx if i in allowed] for idx in dataset.buckets().values()]
    buckets = [b for b in buckets if b]
    bucket = rng.choices(buckets, weights=[len(b) for b in buckets])[0]
    if len(bucket) >= cfg.batch_size:
        return rng.sample(bucket, cfg.batch_size)
    return [rng.choice(bucket) for _ in range(cfg.batch_size)]


@torch.no_grad()
def _latent(family, cache, item, device) -> torch.Tensor:
    key = cache.latent_key(item)
    hit = cache.get("latents", key)
    if hit is None:
        vae = family.pipe.vae
        pixels = data_mod.load_pixels(item).unsqueeze(0).to(device, vae.dtype)
        z = family.normalise(vae.encode(pixels).latent_dist.mode())[0].float()
        cache.put("latents", key, {"latent": z})
        return z.cpu()
    return hit["latent"]


@torch.no_grad()
def _embedding(family, cache, caption: str, device, max_len) -> dict:
    key = cache.text_key(caption, max_len)
    hit = cache.get("text", key)
    if hit is None:
        with models.quiet():
            out = {k: v[0].float() for k, v in family.encode([caption], device).items() if k in family.prompt_outputs}
        cache.put("text", key, out)
        return {k: v.cpu() for k, v in out.items()}
    return hit


@torch.no_grad()
def _eval_loss(family, model, objective, held, embeds, cfg, device, dtype, accelerator) -> dict:
    """Mean loss over `held` (latent, caption) pairs at fixed timestep quantiles of the training distribution, with
    fixed noise: comparable from one evaluation to the next (kohya evaluates at fixed t the same way)."""
    model.eval()
    per_t, ts = [], None
    for j, q in enumerate(cfg.eval_quantiles):
        total = 0.0
        for i, (latent, caption) in enumerate(held):
            x0 = latent.unsqueeze(0).to(device)
            t = objectives.fixed_timesteps(objective, [q], family.seq_len(x0.shape))
            ts = (ts or []) + [float(t[0])] if i == 0 else ts
            cond = {k: embeds[caption][k].unsqueeze(0).to(device, dtype) for k in family.prompt_outputs}
            noise = torch.randn(x0.shape, generator=torch.Generator("cpu").manual_seed(10_000 + i)).to(device)
            d = objectives.draw(objective, x0, noise, timestep=t)
            with accelerator.autocast():
                pred = family.predict(model, d.noisy.to(dtype), d.timestep.to(device), cond, cfg.train_guidance)
            total += objectives.loss(pred, d.target, d.weight.to(device)).item()
        per_t.append(total / len(held))
    model.train()
    return {"loss": sum(per_t) / len(per_t), "per_timestep": per_t, "timesteps": ts, "images": len(held)}


def _mean_tail(losses: list[float], n: int = 20) -> float | None:
    tail = losses[-n:]
    return sum(tail) / len(tail) if tail else None


def _write_log(out: Path, cfg, losses, evals) -> None:
    (out / "history.json").write_text(json.dumps({"losses": losses, "evals": evals}))


# --- checkpoints ----------------------------------------------------------------------------------------------

def _save_checkpoint(out: Path, model, optimizer, step: int, losses, evals, cfg) -> Path:
    """OUT/checkpoints/step-NNNNNN: LoRA weights, optimizer state, history; written to a temporary folder, renamed."""
    from safetensors.torch import save_file

    root = out / CHECKPOINTS
    root.mkdir(exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().float().cpu().contiguous() for k, v in peft_state_dict(model).items()},
              tmp / "adapter.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "losses": losses, "evals": evals,
                                                "identity": _identity(cfg)}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(root.glob("step-*"))[:-max(1, cfg.keep_checkpoints)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _identity(cfg) -> dict:
    """What a checkpoint must agree on to be resumed: the adapter's shape and the data it was trained for."""
    return {"base": str(Path(cfg.base).resolve()), "rank": cfg.rank, "alpha": cfg.alpha,
            "targets": list(cfg.targets), "batch_size": cfg.batch_size}


def _find_checkpoint(out: Path) -> Path | None:
    found = sorted((out / CHECKPOINTS).glob("step-*")) if (out / CHECKPOINTS).is_dir() else []
    return found[-1] if found else None


def _load_checkpoint(path: Path, model, optimizer, cfg) -> tuple[int, list, list]:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    if state["identity"] != _identity(cfg):
        diff = {k: (state["identity"].get(k), v) for k, v in _identity(cfg).items() if state["identity"].get(k) != v}
        raise TrainingError(f"{path}: was trained with other settings: "
                            + ", ".join(f"{k} {a} (now {b})" for k, (a, b) in diff.items()) + ".",
                            hint="Resume with the same settings, or start afresh in another output folder.")
    weights = load_file(path / "adapter.safetensors")
    result = set_peft_model_state_dict(model, weights)
    if getattr(result, "unexpected_keys", None):
        raise TrainingError(f"{path}: checkpoint keys the model does not have: {result.unexpected_keys[:5]}.")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    return state["step"], list(state["losses"]), list(state["evals"])
