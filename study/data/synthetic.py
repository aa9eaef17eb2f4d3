"""The embedded dataset: coloured glyphs on cluttered backgrounds, generated from a seed.

Each class is made of 2–4 sub-modes. A sub-mode is a glyph (a random 5×5
binary pattern, kept at Hamming distance ≥ 5 from every other glyph) drawn in
its own foreground colour; the sub-modes of a class share nothing visible, so
they are real modes (what multi-center losses and easy-positive sampling are
about). A sample is its sub-mode's glyph at a random scale and position on a
random background colour with a smooth random texture and pixel noise: the
nuisance factors dominate raw pixels, so an untrained network retrieves
poorly, while "same glyph, same colour, whatever the background" is learnable
and carries over to unseen classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

GRID = 5


def _glyphs(count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct 5×5 binary glyphs, pairwise Hamming distance ≥ 5, 8–17 cells on."""
    glyphs: list[np.ndarray] = []
    while len(glyphs) < count:
        g = rng.random((GRID, GRID)) < 0.5
        if not 8 <= g.sum() <= 17:
            continue
        if all((g != h).sum() >= 5 for h in glyphs):
            glyphs.append(g)
    return np.stack(glyphs)


def _colours(count: int, rng: np.random.Generator) -> np.ndarray:
    """Saturated foreground colours in [0, 1], from a random hue and value."""
    hue = rng.random(count)
    k = (np.array([5.0, 3.0, 1.0])[None, :] + hue[:, None] * 6) % 6
    rgb = 1 - np.clip(np.minimum(k, 4 - k), 0, 1)  # HSV → RGB at full saturation
    return rgb * rng.uniform(0.6, 1.0, size=(count, 1))


def make_synthetic(
    root: Path | None = None,
    *,
    num_classes: int = 100,
    samples_per_class: int = 48,
    image_size: int = 32,
    min_modes: int = 2,
    max_modes: int = 4,
    seed: int = 0,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Images (N, 3, H, W) uint8, class labels (N,) in 0..C−1, global sub-mode ids (N,).

    ``root`` is unused (the data is generated); it is there so that every dataset builder
    takes the same first argument.
    """
    if num_classes < 4 or samples_per_class < 2 or image_size < 8:
        raise ValueError("synthetic needs num_classes ≥ 4, samples_per_class ≥ 2 and image_size ≥ 8")
    if not 1 <= min_modes <= max_modes:
        raise ValueError(f"need 1 ≤ min_modes ≤ max_modes (got {min_modes}, {max_modes})")
    rng = np.random.default_rng(seed)
    modes_per_class = rng.integers(min_modes, max_modes + 1, size=num_classes)
    mode_class = np.repeat(np.arange(num_classes), modes_per_class)
    glyphs = _glyphs(len(mode_class), rng)
    colours = _colours(len(mode_class), rng)

    labels = np.repeat(np.arange(num_classes), samples_per_class)
    first_mode = np.concatenate([[0], np.cumsum(modes_per_class)[:-1]])
    modes = first_mode[labels] + rng.integers(0, 1 << 30, size=len(labels)) % modes_per_class[labels]
    n, size = len(labels), image_size

    # Background: a random colour, a smooth random texture (upsampled 4×4 noise) and pixel noise.
    grey = rng.uniform(0.1, 0.9, size=(n, 1, 1, 1))
    background = grey + rng.uniform(-0.2, 0.2, size=(n, 3, 1, 1))
    texture = rng.normal(0.0, 0.1, size=(n, 3, 4, 4)).repeat(size // 4 + 1, 2).repeat(size // 4 + 1, 3)
    images = background + texture[:, :, :size, :size]

    # The glyph: nearest-neighbour scaled to 40–75% of the image, at a random position.
    scale = rng.uniform(0.4, 0.75, size=n) * size
    top = rng.uniform(0, 1, size=n) * (size - scale)
    left = rng.uniform(0, 1, size=n) * (size - scale)
    coords = np.arange(size)[None, :] + 0.5
    rows = np.floor((coords - top[:, None]) / scale[:, None] * GRID).astype(int)
    cols = np.floor((coords - left[:, None]) / scale[:, None] * GRID).astype(int)
    inside = ((rows >= 0) & (rows < GRID))[:, :, None] & ((cols >= 0) & (cols < GRID))[:, None, :]
    cells = glyphs[modes[:, None, None], rows.clip(0, GRID - 1)[:, :, None], cols.clip(0, GRID - 1)[:, None, :]]
    mask = (inside & cells)[:, None]
    images = np.where(mask, colours[modes][:, :, None, None], images)
    images += rng.normal(0.0, 0.08, size=images.shape)
    pixels = np.clip(images * 255 + 0.5, 0, 255).astype(np.uint8)
    return torch.from_numpy(pixels), labels, modes
