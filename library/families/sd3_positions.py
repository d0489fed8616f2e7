"""Where SD3's image tokens take their position embeddings from, with the two options of the reference trainer made
for SD3.5: a random crop offset while training (--pos_emb_random_crop_rate) and grids rescaled to each training
resolution (--enable_scaled_pos_embed).

diffusers' PatchEmbed cuts the centre of its stored grid out; `PositionCrop` replaces that one method on the model's
instance. The stored grid is not touched, so saved models stay as they were loaded.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence

import torch

logger = logging.getLogger(__name__)

SCALED_GRID_RATIO = 1.5  # a scaled grid is 1.5x its training size, so other aspect ratios of the same area fit
SCALED_BASE_SIZE = 16  # the grid spacing the releases' grids were made with (positions / 16 per token)
VAE_FACTOR = 8  # pixels per latent of the SD3 VAE


def scaled_grid(embed_dim: int, grid_size: int, sample_size: int) -> torch.Tensor:
    """Sin-cos embeddings (grid_size * grid_size, embed_dim) of a grid whose centre `sample_size` tokens span the
    positions the releases use at their training size (KohakuBlueleaf's rescaling in the reference trainer)."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed_from_grid

    scale = SCALED_BASE_SIZE * grid_size / sample_size
    shift = scale * (grid_size - sample_size) / (2 * grid_size)
    coords = torch.arange(grid_size, dtype=torch.float32) / grid_size * scale - shift
    grid = torch.stack(torch.meshgrid(coords, coords, indexing="xy"))  # (2, G, G): width first, as diffusers
    return get_2d_sincos_pos_embed_from_grid(embed_dim, grid.reshape(2, 1, grid_size, grid_size), output_type="pt")


def latent_sizes(resolutions: Sequence[tuple[int, int]]) -> list[int]:
    """The square latent side of each training resolution (width, height) in pixels, without repeats, ascending."""
    return sorted({round(math.sqrt(width * height)) // VAE_FACTOR for width, height in resolutions})


class ScaledGrids:
    """One rescaled grid per training size; an image takes the grid of the size whose area is closest to its own."""

    def __init__(self, embed_dim: int, patch_size: int, sizes: Sequence[int]):
        self.embed_dim = embed_dim
        self.patched = sorted({size // patch_size for size in sizes})  # token sides of the training sizes
        self.grids: dict[int, torch.Tensor] = {}

    def limits(self) -> list[tuple[int, int]]:
        """(largest area, token side) pairs: areas up to halfway to the next size's take that size's grid."""
        areas = [(small**2 + large**2) // 2 for small, large in zip(self.patched, self.patched[1:])]
        areas.append(int((self.patched[-1] * SCALED_GRID_RATIO) ** 2))
        return list(zip(areas, self.patched))

    def grid_for(self, rows: int, columns: int, like: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(grid (1, S*S, D), S) for an image of rows x columns tokens, on the device and dtype of `like`."""
        side = next((size for area, size in self.limits() if rows * columns <= area), self.patched[-1])
        grid_size = int(side * SCALED_GRID_RATIO)
        if rows > grid_size or columns > grid_size:
            side = max(rows, columns)
            grid_size = int(side * SCALED_GRID_RATIO)
            logger.warning("%dx%d tokens exceed the scaled position grids; adding one for %d tokens", rows, columns,
                           side)  # fmt: skip
            self.patched = sorted({*self.patched, side})
        if side not in self.grids:
            self.grids[side] = scaled_grid(self.embed_dim, grid_size, side)[None]
        grid = self.grids[side].to(like.device, like.dtype)
        return grid, grid_size


class PositionCrop:
    """Replaces `PatchEmbed.cropped_pos_embed` of one transformer: random offsets while `training()` is active (with
    probability `random_rate` per forward pass), and the scaled grids when training sizes are given."""

    def __init__(self, patch_embed: torch.nn.Module, random_rate: float = 0.0, sizes: Sequence[int] | None = None):
        self.patch_embed = patch_embed
        self.random_rate = random_rate
        self.random_active = False
        dim = patch_embed.pos_embed.shape[-1]
        self.scaled = ScaledGrids(dim, patch_embed.patch_size, sizes) if sizes else None

    def install(self) -> None:
        self.patch_embed.cropped_pos_embed = self.crop

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Random offsets inside the block (the training prediction), the centre everywhere else (sampling)."""
        self.random_active = self.random_rate > 0
        try:
            yield
        finally:
            self.random_active = False

    def crop(self, height: int, width: int) -> torch.Tensor:
        """The embeddings (1, rows * columns, D) of latents of height x width."""
        patch = self.patch_embed.patch_size
        rows, columns = height // patch, width // patch
        stored = self.patch_embed.pos_embed
        if self.scaled is not None:
            grid, size = self.scaled.grid_for(rows, columns, stored)
        else:
            grid, size = stored, self.patch_embed.pos_embed_max_size
        if rows > size or columns > size:
            raise ValueError(f"{height}x{width} latents need {rows}x{columns} positions; the grid has {size}x{size}")
        top, left = (size - rows) // 2, (size - columns) // 2
        if self.random_active and torch.rand(1).item() < self.random_rate:
            top = int(torch.randint(0, size - rows + 1, (1,)))
            left = int(torch.randint(0, size - columns + 1, (1,)))
        spatial = grid.reshape(1, size, size, -1)[:, top : top + rows, left : left + columns, :]
        return spatial.reshape(1, rows * columns, -1)
