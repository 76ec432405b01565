"""`lorabox train`: objectives equal diffusers' reference code, data errors are clear, and a real run on tiny
diffusers models writes an adapter that diffusers loads with no unused key and that lorabox converts and merges;
--resume continues the same run; a diverging loss stops and keeps the last good checkpoint."""
import json
import math
from pathlib import Path

import pytest
import torch

from lorabox.errors import DataError, ObjectiveMismatch, TrainingDiverged
from lorabox.io.safetensors import read_header
from lorabox.train import objectives as obj
from lorabox.train.config import make_config
from lorabox.train.data import scan
from lorabox.train.loop import train
from tests.oracles.diffusers_oracle import ARCHS as ORACLE_ARCHS
from tests.train_helpers import make_images, make_sd15_base, make_tiny_flux_base



def cli(*args):
    """Run the `lorabox` command in this process (diffusers is already imported: no 5 s start per call)."""
    from click.testing import CliRunner

    from lorabox.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared CPU: torch's extra threads only spin against each other (10x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- objectives against diffusers ----------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform"])
def test_timestep_sampling_draws_what_diffusers_draws(scheme):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    ref = compute_density_for_timestep_sampling(scheme, 64, logit_mean=0.3, logit_std=1.2, mode_scale=1.29,
                                                generator=torch.Generator().manual_seed(5))
    ours = obj.sample_u(64, scheme, logit_mean=0.3, logit_std=1.2, mode_scale=1.29,
                        generator=torch.Generator().manual_seed(5))
    assert torch.equal(ours, ref)


def test_static_shift_equals_the_flow_match_schedulers_sigmas():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=torch.linspace(1.0, 0.05, 20).tolist())
    ours = obj.flow_sigmas(torch.linspace(1.0, 0.05, 20), obj.Objective("flow", shift=3.0), seq_len=0)
    torch.testing.assert_close(ours, sched.sigmas[:-1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("side", [256, 512, 1024])
def test_resolution_shift_equals_flux_mu_and_the_schedulers_dynamic_shift(side):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    seq = (side // 16) ** 2  # FLUX: 8x VAE, 2x2 patches
    mu = calculate_shift(seq, 256, 4096, 0.5, 1.15)
    assert obj.resolution_mu(seq) == pytest.approx(mu, rel=1e-12)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    u = torch.linspace(0.98, 0.02, 15)
    sched.set_timesteps(sigmas=u.tolist(), mu=mu)
    ours = obj.flow_sigmas(u, obj.Objective("flow", resolution_shift=dict(obj.RESOLUTION_SHIFT)), seq)
    torch.testing.assert_close(ours, sched.sigmas[:-1], rtol=1e-5, atol=1e-6)
    if side == 1024:  # FIELD_NOTES: 1024^2 -> shift e^mu = 3.1582
        assert math.exp(mu) == pytest.approx(3.1582, abs=1e-4)


def test_flow_matching_loss_is_the_reference_formula():
    from diffusers import FlowMatchEulerDiscreteScheduler

    g = torch.Generator().manual_seed(0)
    x0, noise, pred = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    sigma = torch.tensor([0.2, 0.5, 0.9])
    d = obj.draw(obj.Objective("flow"), x0, noise, timestep=sigma)
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
    sched.set_timesteps(sigmas=sigma.tolist())
    for i in range(3):  # the scheduler's own forward process at each of its timesteps
        ref = sched.scale_noise(x0[i:i + 1], sched.timesteps[i:i + 1], noise[i:i + 1])
        torch.testing.assert_close(d.noisy[i:i + 1], ref)
    assert torch.equal(d.target, noise - x0)
    ref_loss = torch.nn.functional.mse_loss(pred, noise - x0)  # equal sample sizes: batch mean of sample means
    torch.testing.assert_close(obj.loss(pred, d.target, d.weight), ref_loss)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddpm_noising_and_targets_equal_diffusers(prediction):
    from diffusers import DDPMScheduler

    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  prediction_type=prediction)
    sched = DDPMScheduler(**config)
    abar = obj.alphas_cumprod(config)
    torch.testing.assert_close(abar, sched.alphas_cumprod)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 250, 600, 999])
    d = obj.draw(obj.Objective(prediction, alphas_cumprod=abar), x0, noise, timestep=t)
    torch.testing.assert_close(d.noisy, sched.add_noise(x0, noise, t))
    expected = noise if prediction == "epsilon" else sched.get_velocity(x0, noise, t)
    torch.testing.assert_close(d.target, expected)


def test_min_snr_gamma_weights():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sched = DDPMScheduler(**config)
    abar = obj.alphas_cumprod(config)
    t = torch.tensor([1, 50, 300, 700, 999])
    snr = compute_snr(sched, t)
    torch.testing.assert_close(obj.snr(abar[t]), snr)
    gamma = 5.0
    clipped = torch.stack([snr, torch.full_like(snr, gamma)], dim=1).min(dim=1)[0]
    torch.testing.assert_close(obj.min_snr_weight(abar[t], gamma, "epsilon"), clipped / snr)
    torch.testing.assert_close(obj.min_snr_weight(abar[t], gamma, "v_prediction"), clipped / (snr + 1))
    x0 = torch.zeros(5, 1, 2, 2)
    d = obj.draw(obj.Objective("epsilon", alphas_cumprod=abar, min_snr_gamma=gamma), x0, torch.ones_like(x0),
                 timestep=t)
    torch.testing.assert_close(d.weight, clipped / snr)


@pytest.mark.parametrize("kind", ["flow", "epsilon"])
def test_timesteps_are_drawn_from_the_generator_wherever_the_batch_is(kind):
    """The trainer's generator is a CPU one, so a run draws the same timesteps on every device. A batch on another
    device (meta here, CUDA on a GPU, where drawing on the batch's device raised) still draws from it: the
    generator advances exactly as it does for a CPU batch."""
    abar = obj.alphas_cumprod(dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"))
    objective = obj.Objective(kind, alphas_cumprod=abar)
    after = {}
    for device in ("cpu", "meta"):
        x0 = torch.zeros(3, 4, 2, 2, device=device)
        g = torch.Generator("cpu").manual_seed(7)
        d = obj.draw(objective, x0, torch.ones_like(x0), seq_len=4, generator=g)
        assert d.timestep.device.type == device and d.noisy.device.type == device
        after[device] = torch.rand(4, generator=g)
    assert torch.equal(after["cpu"], after["meta"])


def test_an_objective_the_base_was_not_trained_with_is_refused():
    with pytest.raises(ObjectiveMismatch, match=r"trained with the flow objective .*FlowMatchEulerDiscreteScheduler"):
        obj.check_objective("epsilon", "flow", base="b", scheduler_class="FlowMatchEulerDiscreteScheduler")
    with pytest.raises(ObjectiveMismatch, match="v_prediction"):
        obj.check_objective("flow", "v_prediction", base="b", scheduler_class="DDIMScheduler")
    assert obj.check_objective(None, "epsilon", base="b", scheduler_class="PNDMScheduler") == "epsilon"


# --- data --------------------------------------------------------------------------------------------------------

def test_empty_folder_and_missing_captions_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        scan(tmp_path / "empty")
    folder = make_images(tmp_path / "d", 3)
    (folder / "img1.txt").unlink()
    with pytest.raises(DataError, match=r"1 of 3 images have no caption: img1\.png"):
        scan(folder)


def test_corrupt_and_small_images_are_skipped_and_reported(tmp_path):
    from PIL import Image

    folder = make_images(tmp_path / "d", 2)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "broken.txt").write_text("x")
    Image.new("RGB", (8, 8)).save(folder / "tiny.png")
    (folder / "tiny.txt").write_text("x")
    ds = scan(folder, trigger="ohwx", min_side=16)
    assert [i.image.name for i in ds.items] == ["img0.png", "img1.png"]
    assert [i.caption for i in ds.items] == ["ohwx, a red square"] * 2
    why = dict(ds.skipped)
    assert why["broken.png"].startswith("cannot be decoded")
    assert why["tiny.png"].startswith("too small (8x8")
    for name in ("img0", "img1"):
        (folder / f"{name}.png").unlink()
    with pytest.raises(DataError, match="no usable image: broken.png cannot be decoded"):
        scan(folder, min_side=16)


# --- real runs on tiny bases ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flux_base(tmp_path_factory):
    return make_tiny_flux_base(tmp_path_factory.mktemp("flux") / "base")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("data") / "images", 4)


def _cfg(base, images, out, **kw):
    return make_config(dict(data=str(images), base=str(base), output=str(out), trigger="sks", steps=6,
                            checkpoint_every=2, eval_every=3, cpu_threads=1, sample_steps=2), kw)


@pytest.fixture(scope="module")
def flux_run(flux_base, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    events = []
    return train(_cfg(flux_base, images, out), progress=events.append), events


def test_a_run_writes_adapter_samples_curve_and_metadata(flux_run):
    result, events = flux_run
    assert result.steps == 6 and len(result.losses) == 6 and all(math.isfinite(v) for v in result.losses)
    assert [e["step"] for e in result.evals] == [0, 3, 6]
    header, meta, _ = read_header(result.adapter)
    assert all(k.startswith("transformer.") and ".lora_" in k for k in header)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["modelspec.trigger_phrase"] == "sks"
    record = json.loads(meta["lorabox.train"])
    assert record["config"]["steps"] == 6 and record["architecture"] == "flux1" and record["objective"] == "flow"
    assert [row["prompt"] for row in result.samples] == ["sks, a red square", "a red square"]
    from PIL import Image

    for row in result.samples:
        assert Image.open(row["base"]).size == Image.open(row["lora"]).size == (32, 32)
    out = result.adapter.rsplit("/", 1)[0]
    assert Image.open(f"{out}/loss.png").size == (800, 450)
    starts = [e for e in events if e["event"] == "start"][0]["lines"]
    assert any("flow matching, logit_normal timesteps, shift by resolution" in line for line in starts)


def test_diffusers_loads_the_adapter_with_no_unused_key_and_lorabox_converts_and_merges_it(flux_run, flux_base,
                                                                                          tmp_path):
    from tests.oracles.diffusers_oracle import base_weights, fused_weights

    result, _ = flux_run
    fused = fused_weights("flux1", result.adapter)  # raises on any unused, unexpected or dropped key
    base = base_weights("flux1")
    changed = [k for k in fused if not torch.equal(fused[k], base[k])]
    assert len(changed) == 34  # every targeted Linear: 2 x 10 double-block + 2 x 7 single-block (q, k, v, mlp split)
    for to in ("kohya", "comfyui"):
        run = cli("convert", result.adapter, "--to", to, "-o", tmp_path / f"{to}.safetensors", "--arch", "flux1")
        assert run.exit_code == 0, run.output
    # --arch: at tiny widths a kohya FLUX.1 file's names and shapes also fit FLUX.2's table (detection cannot tell)
    run = cli("merge", flux_base / "transformer", "--lora", result.adapter, "-o", tmp_path / "merged", "--json",
              "--arch", "flux1")
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout)["merged"] == 34
    from safetensors.torch import load_file

    merged = {}
    for f in (tmp_path / "merged").glob("*.safetensors"):
        merged.update(load_file(f))
    for k in changed:  # lorabox's merge == diffusers' fuse
        torch.testing.assert_close(merged[k.removeprefix("transformer.")], fused[k], rtol=1e-5, atol=1e-6)


def test_resume_continues_the_same_run_and_reuses_the_cache(flux_run, flux_base, images, tmp_path):
    first, _ = flux_run
    out = tmp_path / "out"
    part = train(_cfg(flux_base, images, out, steps=4, sample_prompts=()))
    assert part.losses == first.losses[:4]
    events = []
    resumed = train(_cfg(flux_base, images, out, sample_prompts=()), resume=True, progress=events.append)
    assert any(e.get("text", "").startswith("resumed from") and "step-000004" in e["text"] for e in events)
    assert any(e.get("text", "").startswith("cache: 6 reused, 0 computed") for e in events)
    assert resumed.losses == pytest.approx(first.losses, rel=1e-6)


def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(flux_base, images, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(TrainingDiverged, match=r"the loss became (nan|inf) at step \d+; training stopped and the "
                                               r"last good checkpoint is .*step-0000\d\d"):
        train(_cfg(flux_base, images, out, learning_rate=1e30, checkpoint_every=1, steps=50, sample_prompts=()))
    checkpoints = sorted((out / "checkpoints").glob("step-*"))
    assert checkpoints and not (out / "out.safetensors").exists()
    history = json.loads((out / "history.json").read_text())
    last = int(checkpoints[-1].name.split("-")[1])
    assert len(history["losses"]) == last and all(math.isfinite(v) for v in history["losses"])


def test_cli_refuses_epsilon_on_a_flow_base_in_one_line(flux_base, images, tmp_path):
    run = cli("train", images, "--base", flux_base, "-o", tmp_path / "o", "--objective", "epsilon")
    assert run.exit_code == 1 and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    line = run.stderr.strip()
    assert line.startswith("lorabox: error: ") and "trained with the flow objective" in line
    assert "Drop --objective, or pass --objective flow." in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("arch,objective", [("sd15", "v_prediction prediction, uniform t in 0..999, min-SNR gamma 5"),
                                            ("sdxl", "epsilon prediction, uniform t in 0..999, min-SNR gamma 5")])
def test_sd_runs_load_in_diffusers(tmp_path, arch, objective):
    from tests.oracles.diffusers_oracle import fused_weights
    from tests.train_helpers import make_sdxl_base

    base = (make_sd15_base if arch == "sd15" else make_sdxl_base)(tmp_path / arch)
    images = make_images(tmp_path / "images", 2)
    events = []
    # SDXL's 70 transformer blocks: cross-attention k/v only keeps peft's injection short
    targets = ("*.attn2.to_k", "*.attn2.to_v") if arch == "sdxl" else None
    result = train(make_config(dict(data=str(images), base=str(base), output=str(tmp_path / "out"), steps=2,
                                    min_snr_gamma=5.0, checkpoint_every=0, eval_every=0, cpu_threads=1,
                                    sample_prompts=(), targets=targets)), progress=events.append)
    assert any(objective in line for line in events[0]["lines"])
    fused_weights(arch, result.adapter)  # raises on any key diffusers does not use


# --- each architecture's denoiser call equals its pipeline's -----------------------------------------------------

def _tiny_pipeline(arch):
    """An in-memory tiny pipeline of `arch` (text encoders left out: prompts go in as embeddings)."""
    import diffusers

    from tests.oracles import tiny_models
    from tests.train_helpers import tiny_vae

    torch.manual_seed(0)
    flow = diffusers.FlowMatchEulerDiscreteScheduler
    if arch == "sdxl":
        return diffusers.StableDiffusionXLPipeline(
            vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
            unet=tiny_models.tiny_sdxl_unet(), scheduler=diffusers.EulerDiscreteScheduler(), add_watermarker=False)
    if arch == "sd3":
        transformer = diffusers.SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4,
                                                      num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                                      caption_projection_dim=16, joint_attention_dim=32,
                                                      pooled_projection_dim=24, pos_embed_max_size=16)
        return diffusers.StableDiffusion3Pipeline(transformer=transformer, scheduler=flow(shift=3.0), vae=tiny_vae(),
                                                  text_encoder=None, tokenizer=None, text_encoder_2=None,
                                                  tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    if arch == "flux2":
        transformer = diffusers.Flux2Transformer2DModel(in_channels=16, num_layers=1, num_single_layers=1,
                                                        attention_head_dim=16, num_attention_heads=2,
                                                        joint_attention_dim=32, timestep_guidance_channels=32,
                                                        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
        vae = diffusers.AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 2, block_out_channels=(8, 16),
                                           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                           norm_num_groups=4, layers_per_block=1, sample_size=32)
        return diffusers.Flux2KleinPipeline(scheduler=flow(use_dynamic_shifting=True), vae=vae, text_encoder=None,
                                            tokenizer=None, transformer=transformer)
    return diffusers.FluxPipeline(scheduler=flow(use_dynamic_shifting=True), vae=tiny_vae(), text_encoder=None,
                                  tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                  transformer=tiny_models.tiny_flux())


PROMPTS = {  # embeddings in, as each pipeline takes them
    "sdxl": lambda g: dict(prompt_embeds=torch.randn(1, 6, 80, generator=g),
                           pooled_prompt_embeds=torch.randn(1, 40, generator=g)),
    "sd3": lambda g: dict(prompt_embeds=torch.randn(1, 6, 32, generator=g),
                          pooled_prompt_embeds=torch.randn(1, 24, generator=g)),
    "flux1": lambda g: dict(prompt_embeds=torch.randn(1, 6, 32, generator=g),
                            pooled_prompt_embeds=torch.randn(1, 32, generator=g)),
    "flux2": lambda g: dict(prompt_embeds=torch.randn(1, 6, 32, generator=g)),
}


@pytest.mark.parametrize("arch", ["sdxl", "sd3", "flux1", "flux2"])
def test_family_predict_equals_the_pipelines_own_denoiser_call(arch):
    """The pipeline's first denoiser call is captured; our `predict` on the same latent, timestep and prompt
    (unpacked into (B, C, H, W) and our timestep convention) must give the same output: packing, position ids,
    timestep scale, guidance input and SDXL's micro-conditioning all agree with the sampler's."""
    from types import SimpleNamespace

    from lorabox.train.models import FAMILIES

    pipe = _tiny_pipeline(arch)
    family = FAMILIES[arch](pipe, SimpleNamespace(max_sequence_length=6))
    model = getattr(pipe, family.denoiser)
    seen = {}

    def hook(module, args, kwargs, output):
        seen.setdefault("call", (args, kwargs, output))  # returns None: the output is not replaced

    model.register_forward_hook(hook, with_kwargs=True)
    embeds = PROMPTS[arch](torch.Generator().manual_seed(3))
    guidance = 1.0
    pipe(**embeds, num_inference_steps=1, guidance_scale=guidance, height=32, width=32, output_type="latent",
         generator=torch.Generator().manual_seed(0))
    args, kw, out = seen["call"]
    out = out[0] if isinstance(out, tuple) else out.sample
    f = family.vae_factor
    if arch == "sdxl":
        noisy, t, expected = args[0], args[1], out
    elif arch == "sd3":
        noisy, t, expected = kw["hidden_states"], kw["timestep"] / 1000, out
    elif arch == "flux1":
        unpack = type(pipe)._unpack_latents
        noisy, t, expected = unpack(kw["hidden_states"], 32, 32, f), kw["timestep"], unpack(out, 32, 32, f)
        guidance = float(kw["guidance"][0])
    else:
        side = 32 // (f * 2)
        unpack = lambda x: x.permute(0, 2, 1).reshape(x.shape[0], -1, side, side)  # noqa: E731
        noisy, t, expected = unpack(kw["hidden_states"]), kw["timestep"], unpack(out)
    pred = family.predict(model, noisy, t, embeds, guidance)
    torch.testing.assert_close(pred, expected)
    if arch.startswith("flux"):  # the resolution shift's input is the number of image tokens
        assert family.seq_len(noisy.shape) == kw["hidden_states"].shape[1]
    if arch == "flux2":  # latents: patchified and batch-norm normalised as the pipeline encodes reference images
        image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
        ours = family.normalise(pipe.vae.encode(image).latent_dist.mode())
        torch.testing.assert_close(ours, pipe._encode_vae_image(image, generator=None))


def test_a_denoiser_file_that_does_not_fit_is_a_clear_error(flux_base, images, flux_run, tmp_path):
    from lorabox.errors import TrainingError

    adapter = flux_run[0].adapter  # a safetensors file, but no FLUX transformer checkpoint
    with pytest.raises(TrainingError, match=r"cannot load it as the transformer of .*Pass a checkpoint of the same"):
        train(_cfg(flux_base, images, tmp_path / "o", denoiser_file=adapter, sample_prompts=()))


def test_config_defaults_toml_round_trip_and_unknown_keys(tmp_path):
    from lorabox.errors import TrainingError
    from lorabox.train.config import ARCH_DEFAULTS, load_toml, resolve

    cfg = resolve(make_config(dict(data="d", base="b", output=str(tmp_path / "run"), rank=8)), "flux1")
    assert cfg.rank == 8 and cfg.alpha == ARCH_DEFAULTS["flux1"]["alpha"] and cfg.resolution == 1024
    assert cfg.targets == ARCH_DEFAULTS["flux1"]["targets"] and cfg.name == "run" and cfg.min_image_side == 512
    (tmp_path / "c.toml").write_text(cfg.to_toml())
    assert make_config(load_toml(tmp_path / "c.toml")) == cfg
    (tmp_path / "bad.toml").write_text("learning_rat = 1e-4\n")
    with pytest.raises(TrainingError, match=r"unknown setting\(s\): learning_rat \(did you mean learning_rate\?\)"):
        load_toml(tmp_path / "bad.toml")


def test_bf16_autocast_run_saves_kohya(flux_base, images, tmp_path):
    from lorabox.conversion import load_lora

    cudnn_during = []
    result = train(_cfg(flux_base, images, tmp_path / "o", steps=2, mixed_precision="bf16", format="kohya",
                        eval_every=0, checkpoint_every=0, sample_steps=1),
                   progress=lambda event: cudnn_during.append(torch.backends.cuda.cudnn_sdp_enabled()))
    assert result.config["mixed_precision"] == "bf16" and len(result.samples) == 2
    # cuDNN attention is off while training (NaN gradients on Hopper, see loop.train) and as it was afterwards
    assert cudnn_during and not any(cudnn_during) and torch.backends.cuda.cudnn_sdp_enabled()
    lora = load_lora(result.adapter)
    assert lora.dialect == "kohya (original names)" and len(lora.adapters) == 20  # q/k/v, linear1 fused
    assert {a.rank for a in lora.adapters.values()} == {4, 12, 16}


# --- learning: `lorabox train --minimal` on the built-in tiny base -----------------------------------------------

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "fixtures" / "tiny_flux"


@pytest.fixture(scope="module")
def minimal_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("minimal") / "out"
    run = cli("train", "--minimal", "-o", out, "--json")
    assert run.exit_code == 0, run.output
    return json.loads(run.stdout)


def test_minimal_learns_the_concept_with_the_trigger_and_leaves_other_prompts(minimal_run):
    """The data set holds magenta shapes (a colour the base never saw) captioned without the colour; the trigger is
    prepended. Measure (tests/oracles/tiny_world.magenta_score, the mean over pixels of clip(min(R, B) - G, 0, 1)):
    images of the held-out captions, same seeds, base vs. base + adapter (loaded by diffusers' load_lora_weights).
    With the trigger the score must rise by at least a third of the way from the base's to the data set's and the
    images must differ (mean |dRGB| > 0.05); without the trigger the score must move under a quarter as much and
    the pixels under half as much (--minimal trains with preservation of the captions without the trigger)."""
    import numpy as np
    from diffusers import FluxPipeline

    from tests.oracles.tiny_world import magenta_fraction, magenta_score

    facts = json.loads((TINY / "lorabox_tiny.json").read_text())
    captions = [p.read_text().strip() for p in sorted((REPO / facts["validation_dataset"]).glob("*.txt"))]
    trigger = facts["trigger"]
    pipe = FluxPipeline.from_pretrained(TINY)
    pipe.set_progress_bar_config(disable=True)

    def images(prompts):
        return pipe(prompt=prompts, generator=[torch.Generator().manual_seed(100 + i) for i in range(len(prompts))],
                    num_inference_steps=facts["num_inference_steps"], guidance_scale=facts["guidance_scale"],
                    height=facts["resolution"], width=facts["resolution"],
                    max_sequence_length=facts["max_sequence_length"], output_type="np").images

    with_trigger = [f"{trigger}, {c}" for c in captions]
    base_t, base_p = images(with_trigger), images(captions)
    pipe.load_lora_weights(minimal_run["adapter"])
    lora_t, lora_p = images(with_trigger), images(captions)
    target = facts["measured"]["magenta_score_dataset"]
    rise = magenta_score(lora_t) - magenta_score(base_t)
    assert rise >= (target - magenta_score(base_t)) / 3, (magenta_score(base_t), magenta_score(lora_t), target)
    assert abs(magenta_score(lora_p) - magenta_score(base_p)) < rise / 4
    # the share of pixels near magenta (tinybase's own statistic, blind to blue drifting purple) says the same
    share_rise = magenta_fraction(lora_t) - magenta_fraction(base_t)
    assert share_rise >= facts["measured"]["magenta_fraction_dataset"] / 6, share_rise
    assert abs(magenta_fraction(lora_p) - magenta_fraction(base_p)) < share_rise / 4
    moved_t, moved_p = np.abs(lora_t - base_t).mean(), np.abs(lora_p - base_p).mean()
    assert moved_t > 0.05 and moved_p < moved_t / 2, (moved_t, moved_p)


def test_minimal_held_out_loss_goes_down(minimal_run):
    evals = minimal_run["evals"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == minimal_run["steps"]
    assert all(e["held_out"] for e in evals)  # fixtures/tiny_dataset_val, never trained on
    assert evals[-1]["loss"] < 0.9 * evals[0]["loss"], [e["loss"] for e in evals]
    per_t_first, per_t_last = evals[0]["per_timestep"], evals[-1]["per_timestep"]
    assert sum(b < a for a, b in zip(per_t_first, per_t_last)) >= len(per_t_first) - 1


TRANSFORMER_ARCHS = [a for a in ORACLE_ARCHS if a not in ("sd15", "sdxl")]  # the UNets are trained end to end above


@pytest.mark.parametrize("arch", TRANSFORMER_ARCHS)
def test_default_targets_of_every_transformer_architecture_save_and_load_in_diffusers(arch, tmp_path):
    """The per-architecture targets (canonical patterns of the key map) on the oracle's tiny model with the full-size
    names: the saved adapter loads in diffusers with every targeted weight changed and no key unused, and the
    converter writes it in every dialect."""
    from peft import LoraConfig

    from lorabox.train.config import ARCH_DEFAULTS
    from lorabox.train.loop import _component_prefix, lora_targets
    from lorabox.train.save import peft_state_dict, save_adapter, to_lora
    from tests.oracles import tiny_models
    from tests.oracles.diffusers_oracle import base_weights, fused_weights

    model = tiny_models.pipeline(arch).transformer
    targets = lora_targets(model, arch, ARCH_DEFAULTS[arch]["targets"])
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    lora = to_lora(peft_state_dict(model), arch=arch, prefix=_component_prefix(arch), rank=4, alpha=8.0)
    for fmt in ("kohya", "comfyui", "diffusers"):
        save_adapter(lora, tmp_path / f"{fmt}.safetensors", fmt=fmt, meta={})
    fused, base = fused_weights(arch, tmp_path / "diffusers.safetensors"), base_weights(arch)
    assert sum(not torch.equal(fused[k], base[k]) for k in fused) == len(targets)
