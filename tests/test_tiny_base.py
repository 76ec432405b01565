"""The tiny Flux base (fixtures/tiny_flux, from scripts/make_tiny_base.py) is a working pretrained model whose prompts
control colours, and which never draws the held-out colour of fixtures/tiny_dataset: what makes a LoRA's effect on it
measurable.  Statistics are those of tests/oracles/tiny_world.py, on FluxPipeline's own samples at the fixture's
recorded settings (lorabox_tiny.json), offline, from the folder."""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.oracles import tiny_world as world

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "fixtures" / "tiny_flux"
DATASET = REPO / "fixtures" / "tiny_dataset"
VALIDATION = REPO / "fixtures" / "tiny_dataset_val"

# Margins, set below what the fixture measures (lorabox_tiny.json "measured") and far above chance.
# Redness (mean R - B) of red vs blue objects on white and gray backgrounds: drawn images differ by about 0.29.
MIN_REDNESS_SEPARATION = 0.15  # measured 0.29
# Object colour: the palette colour covering most pixels besides the background's (chance 1/8).
MIN_OBJECT_ACCURACY = 6 / 8  # measured 8/8
# Background: the nearest palette colour of the 2-pixel border (chance 1/9).
MIN_BACKGROUND_ACCURACY = 7 / 9  # measured 9/9
# The base must stay far from the data set's magenta: below a quarter of the data set's score for every prompt kind.
MAX_BASE_MAGENTA_FRACTION = 0.25


@pytest.fixture(scope="module")
def facts():
    return json.loads((BASE / "lorabox_tiny.json").read_text())


@pytest.fixture(scope="module")
def pipe(monkeypatch_module):
    import torch
    from diffusers import FluxPipeline

    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, by far on a busy machine
    pipe = FluxPipeline.from_pretrained(BASE, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def sample(pipe, facts, prompts, seed=0):
    import torch

    return pipe(
        prompt=prompts, height=facts["resolution"], width=facts["resolution"],
        num_inference_steps=facts["num_inference_steps"], guidance_scale=facts["guidance_scale"],
        max_sequence_length=facts["max_sequence_length"], output_type="np",
        generator=torch.Generator().manual_seed(seed),
    ).images  # fmt: skip


def read_dataset(folder):
    from PIL import Image

    images = sorted(folder.glob("*.png"))
    captions = [p.with_suffix(".txt").read_text().strip() for p in images]
    return np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) / 255 for p in images]), captions


def test_pipeline_is_flux_shaped_and_small(pipe):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    assert isinstance(pipe.transformer, FluxTransformer2DModel) and pipe.transformer.config.guidance_embeds
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels  # 2x2 packing
    assert isinstance(pipe.vae, AutoencoderKL) and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.text_encoder_2, T5EncoderModel)
    size = sum(f.stat().st_size for f in BASE.rglob("*") if f.is_file())
    assert size < 8 * 2**20, size


def test_every_vocabulary_word_is_one_token_after_reload(pipe):
    for word in world.VOCABULARY:
        assert pipe.tokenizer.tokenize(word) == [word + "</w>"], word
        assert pipe.tokenizer_2.tokenize(word) == ["▁" + word], word
    # the CLIP pooled output is read at the first end-of-text token, which must be the tokenizer's
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id != 2


def test_prompts_control_colours(pipe, facts):
    red = sample(pipe, facts, [world.caption(s, "red", b) for s in world.SHAPES for b in ("white", "gray")])
    blue = sample(pipe, facts, [world.caption(s, "blue", b) for s in world.SHAPES for b in ("white", "gray")])
    assert world.redness(red) - world.redness(blue) > MIN_REDNESS_SEPARATION, (world.redness(red), world.redness(blue))

    objects, backgrounds = world.colour_prompts()
    images = sample(pipe, facts, [p for p, _, _ in objects])
    found = [world.most_present(im, exclude=(bg,)) for im, (_, _, bg) in zip(images, objects)]
    hits = sum(f == c for f, (_, c, _) in zip(found, objects))
    assert hits / len(objects) >= MIN_OBJECT_ACCURACY, [(c, f) for f, (_, c, _) in zip(found, objects)]

    images = sample(pipe, facts, [p for p, _ in backgrounds])
    found = [world.nearest_palette(world.border_rgb(im)) for im in images]
    hits = sum(f == b for f, (_, b) in zip(found, backgrounds))
    assert hits / len(backgrounds) >= MIN_BACKGROUND_ACCURACY, [(b, f) for f, (_, b) in zip(found, backgrounds)]


def test_dataset_is_the_held_out_concept():
    images, captions = read_dataset(DATASET)
    val_images, val_captions = read_dataset(VALIDATION)
    assert len(images) >= 8 and len(val_images) >= 2
    assert images.shape[1:] == (world.SIZE, world.SIZE, 3)
    for caption in captions + val_captions:
        assert world.HELD_OUT not in caption and world.TRIGGER not in caption, caption
    assert world.magenta_fraction(images) > 0.1 and world.magenta_fraction(val_images) > 0.1
    assert world.magenta_score(images) > 0.08 and world.magenta_score(val_images) > 0.08


def test_base_does_not_draw_the_held_out_concept(pipe, facts):
    images, captions = read_dataset(DATASET)
    captions = captions[:6]
    for prompts in (captions, [f"{facts['trigger']} {c}" for c in captions]):
        base = sample(pipe, facts, prompts)
        for measure in (world.magenta_fraction, world.magenta_score):
            assert measure(base) < MAX_BASE_MAGENTA_FRACTION * measure(images), (measure.__name__, prompts[0])


def test_facts_match_the_generator(facts):
    assert facts["trigger"] == world.TRIGGER and facts["resolution"] == world.SIZE
    images = read_dataset(DATASET)[0]  # PNG rounding moves the statistics by < 0.01
    assert facts["measured"]["magenta_fraction_dataset"] == pytest.approx(world.magenta_fraction(images), abs=0.01)
    assert facts["measured"]["magenta_score_dataset"] == pytest.approx(world.magenta_score(images), abs=0.01)
