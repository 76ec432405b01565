"""The synthetic image world of the tiny Flux base (fixtures/tiny_flux) and the statistics that measure it.

One coloured shape on a flat background, 32x32 RGB, captioned from a small vocabulary::

    "a red circle on a blue background"

``scripts/make_tiny_base.py`` pretrains the tiny base on this world with every colour of ``PALETTE`` and writes the
LoRA dataset (fixtures/tiny_dataset) from the held-out colour ``HELD_OUT``: magenta shapes whose captions leave the
object's colour out ("a circle on a blue background"), so a trigger word prepended by the trainer must carry it.
``magenta_fraction`` measures it (the share of pixels near magenta: about 0.16 for the data set, 0 for the base);
``magenta_score`` (how far red and blue exceed green) is a softer measure that also rises when colours drift purple.

Everything is numpy and seeded: the same seed draws the same images, bit for bit.
"""

from __future__ import annotations

import numpy as np

SIZE = 32  # pixels per side
SUPERSAMPLE = 4  # shapes are drawn at 4x and averaged down, so edges are anti-aliased like real images

# Colour name -> RGB in [0, 1].  No pretraining colour has min(R, B) > G, so none scores as magenta.
PALETTE = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.10, 0.20, 0.90),
    "yellow": (0.95, 0.90, 0.10),
    "cyan": (0.10, 0.85, 0.90),
    "orange": (1.00, 0.55, 0.05),
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
    "gray": (0.50, 0.50, 0.50),
}
HELD_OUT = "magenta"
HELD_OUT_RGB = (0.90, 0.10, 0.85)
SHAPES = ("circle", "square", "triangle")
TRIGGER = "ohwx"  # a rare word with its own token in both tokenizers, never seen in pretraining

# Every word the tokenizers hold as one token (anything else still tokenizes, as characters).
VOCABULARY = (
    ("a", "an", "the", "on", "of", "with", "in", "and", "background", "photo", "picture", "image", "shape", "style")
    + tuple(PALETTE)
    + (HELD_OUT, "purple", "pink", "stripes", "striped")
    + SHAPES
    + (TRIGGER,)
)

# Per image and colour, one brightness offset for all three channels: colours vary a little, as in any real data set,
# and a grey stays grey (a per-channel jitter would give white or grey pixels a small magenta score).
BRIGHTNESS_JITTER = 0.05


def caption(shape: str, colour: str | None, background: str | None) -> str:
    """The caption of one image; ``None`` leaves the object's colour or the background out."""
    words = ["a"] + ([colour] if colour else []) + [shape]
    if background:
        words += ["on", "a", background, "background"]
    return " ".join(words)


def colour_prompts():
    """Prompts a base must follow: ([(prompt, object colour, background)] for every object colour on gray,
    [(prompt, background)] for every background under a white circle (black on white))."""
    objects = [(caption("circle", c, "gray"), c, "gray") for c in PALETTE if c != "gray"]
    backgrounds = [(caption("circle", "black" if b == "white" else "white", b), b) for b in PALETTE]
    return objects, backgrounds


def _mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one shape centred at (cx, cy) with half-size r, in pixels."""
    n = SIZE * SUPERSAMPLE
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / SUPERSAMPLE
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif shape == "square":
        inside = (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    elif shape == "triangle":  # apex up: below the top edge and inside both slanted sides
        inside = (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return inside.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean(axis=(1, 3))


def draw(shape: str, rgb, background_rgb, rng: np.random.Generator) -> np.ndarray:
    """One HxWx3 float32 image in [0, 1]: a shape of random position and size, colours jittered by ``rng``."""
    r = rng.uniform(6.0, 10.0)
    cx, cy = rng.uniform(r + 1, SIZE - r - 1, size=2)
    fg = np.clip(np.asarray(rgb) + rng.uniform(-BRIGHTNESS_JITTER, BRIGHTNESS_JITTER), 0, 1)
    bg = np.clip(np.asarray(background_rgb) + rng.uniform(-BRIGHTNESS_JITTER, BRIGHTNESS_JITTER), 0, 1)
    m = _mask(shape, cx, cy, r)[..., None]
    return (m * fg + (1 - m) * bg).astype(np.float32)


def sample_pretraining(rng: np.random.Generator):
    """One pretraining example: (image, full caption, shape, colour, background); colours from ``PALETTE`` only."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour, background = rng.choice(list(PALETTE), size=2, replace=False)
    image = draw(shape, PALETTE[colour], PALETTE[background], rng)
    return image, shape, str(colour), str(background)


def sample_held_out(rng: np.random.Generator):
    """One LoRA data set example: a magenta shape on a pretraining background; the caption omits "magenta"."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    background = str(rng.choice(list(PALETTE)))
    image = draw(shape, HELD_OUT_RGB, PALETTE[background], rng)
    return image, caption(shape, None, background)


def sample_random_colours(rng: np.random.Generator) -> np.ndarray:
    """An image with uniformly random colours: the VAE learns every colour, not only the palette."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    return draw(shape, rng.uniform(0, 1, 3), rng.uniform(0, 1, 3), rng)


MAGENTA_RADIUS = 0.3  # every palette colour is >= 0.75 from magenta, a red/blue edge blend about 0.5


# ---- statistics on HxWx3 (or NxHxWx3) arrays in [0, 1], as FluxPipeline(output_type="np") returns them ----


def magenta_fraction(images: np.ndarray) -> float:
    """Fraction of pixels within MAGENTA_RADIUS of the held-out colour: the concept itself (magenta objects).

    The measure to judge a LoRA by: about 0.16 for the data set, 0 for the base; a global shift of hue (blue turning
    purple) does not count, while it does raise ``magenta_score``.
    """
    return colour_fraction(images, HELD_OUT_RGB, MAGENTA_RADIUS)


def magenta_score(images: np.ndarray) -> float:
    """Mean over pixels of clip(min(R, B) - G, 0, 1): 0 for every pretraining colour, 0.75 for a magenta pixel."""
    images = np.asarray(images, dtype=np.float64)
    return float(np.clip(np.minimum(images[..., 0], images[..., 2]) - images[..., 1], 0, 1).mean())


def redness(images: np.ndarray) -> float:
    """Mean over pixels of R - B: positive for red-dominated images, negative for blue-dominated ones."""
    images = np.asarray(images, dtype=np.float64)
    return float((images[..., 0] - images[..., 2]).mean())


def border_rgb(images: np.ndarray, width: int = 2) -> np.ndarray:
    """Mean RGB of the outer ``width`` pixels, which shapes never reach (centres keep r + 1 from the edge)."""
    images = np.asarray(images, dtype=np.float64)
    inner = np.zeros(images.shape[-3:-1], dtype=bool)
    inner[width:-width, width:-width] = True
    return images[..., ~inner, :].reshape(-1, 3).mean(axis=0)


def colour_fraction(image: np.ndarray, rgb, radius: float = 0.25) -> float:
    """Fraction of an image's pixels within ``radius`` (Euclidean, RGB in [0, 1]) of ``rgb``."""
    image = np.asarray(image, dtype=np.float64)
    return float((np.linalg.norm(image - np.asarray(rgb), axis=-1) < radius).mean())


def most_present(image: np.ndarray, exclude=()) -> str:
    """The palette colour covering most pixels of one image, leaving out ``exclude`` (e.g. the background asked for)."""
    names = [n for n in PALETTE if n not in exclude]
    return max(names, key=lambda n: colour_fraction(image, PALETTE[n]))


def nearest_palette(rgb) -> str:
    """The palette colour nearest to one RGB value (e.g. ``border_rgb`` of an image)."""
    return min(PALETTE, key=lambda n: float(np.linalg.norm(np.asarray(PALETTE[n]) - np.asarray(rgb))))
