"""`lorabox train`: objectives equal diffusers' reference code, data errors are clear, and a real run on tiny
diffusers models writes an adapter that diffusers loads with no unused key and that lorabox converts and merges;
--resume continues the same run; a diverging loss stops and keeps the last good checkpoint."""
import json
import math
import subprocess
import sys

import pytest
import torch

from lorabox.errors import DataError, ObjectiveMismatch, TrainingDiverged
from lorabox.io.safetensors import read_header
from lorabox.train import objectives as obj
from lorabox.train.config import make_config
from lorabox.train.data import scan
from lorabox.train.loop import train
from tests.train_helpers import make_images, make_sd15_base, make_tiny_flux_base

CLI = [sys.executable, "-m", "lorabox"]


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
    assert [e["step"] for e in result.evals] == [3, 6]
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
        proc = subprocess.run([*CLI, "convert", result.adapter, "--to", to, "-o", tmp_path / f"{to}.safetensors"],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([*CLI, "merge", flux_base / "transformer", "--lora", tmp_path / "kohya.safetensors",
                           "-o", tmp_path / "merged", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["merged"] == 34
    from safetensors.torch import load_file

    merged = {}
    for f in (tmp_path / "merged").glob("*.safetensors"):
        merged.update(load_file(f))
    for k in changed:  # lorabox's merge of the kohya spelling == diffusers' fuse of the PEFT file
        torch.testing.assert_close(merged[k.removeprefix("transformer.")], fused[k], rtol=1e-5, atol=1e-6)


def test_resume_continues_the_same_run_and_reuses_the_cache(flux_run, flux_base, images, tmp_path):
    first, _ = flux_run
    out = tmp_path / "out"
    part = train(_cfg(flux_base, images, out, steps=4, sample_prompts=()))
    assert part.losses == first.losses[:4]
    events = []
    resumed = train(_cfg(flux_base, images, out, sample_prompts=()), resume=True, progress=events.append)
    assert any(e.get("text", "").startswith("resumed from") and "step-000004" in e["text"] for e in events)
    assert any(e.get("text", "").startswith("cache: 7 reused, 0 computed") for e in events)
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
    proc = subprocess.run([*CLI, "train", images, "--base", flux_base, "-o", tmp_path / "o", "--objective", "epsilon"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("lorabox: error: ") and "trained with the flow objective" in line
    assert "Drop --objective, or pass --objective flow." in line
    assert not (tmp_path / "o").exists()


def test_sd15_v_prediction_run_loads_in_diffusers(tmp_path):
    from tests.oracles.diffusers_oracle import fused_weights

    base = make_sd15_base(tmp_path / "sd15")
    images = make_images(tmp_path / "images", 2)
    events = []
    result = train(make_config(dict(data=str(images), base=str(base), output=str(tmp_path / "out"), steps=2,
                                    min_snr_gamma=5.0, checkpoint_every=0, eval_every=0, cpu_threads=1,
                                    sample_prompts=())), progress=events.append)
    assert any("v_prediction prediction, uniform t in 0..999, min-SNR gamma 5" in line
               for line in events[0]["lines"])
    fused_weights("sd15", result.adapter)  # raises on any key diffusers does not use
