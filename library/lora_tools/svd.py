"""Low-rank factorisation for the LoRA tools: singular values of a weight change given in full or as LoRA factors,
the rank rules of resize (fixed, sv_ratio, sv_fro, sv_cumulative), and the kept energy of each choice.

A change given as factors up (out, R) @ down (R, in) is decomposed exactly through the QR factors of both sides and an
SVD of an R x R core, which costs O((out + in) R^2) instead of a full SVD of the out x in matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from library.errors import ConfigError

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
ZERO_SINGULAR_VALUE = 1e-6  # below this the change is zero; it keeps rank 1, as the reference does


@dataclass
class Spectrum:
    """U (out, q), S (q,), Vh (q, in) of a matrix M, and ||M||_F^2 (all of S's energy when q is the full rank)."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    energy: float
    complete: bool  # S holds every non-zero singular value


@dataclass(frozen=True)
class RankRule:
    """How many singular vectors to keep: at most `max_rank`; a dynamic method picks fewer by `param`."""

    max_rank: int
    method: str | None = None
    param: float | None = None

    def __post_init__(self) -> None:
        if self.max_rank < 1:
            raise ConfigError(f"the new rank must be 1 or more, got {self.max_rank}")
        if self.method is not None and self.method not in DYNAMIC_METHODS:
            raise ConfigError(f"--dynamic_method must be one of {', '.join(DYNAMIC_METHODS)}, got {self.method!r}")
        if self.method is not None and (self.param is None or self.param <= 0):
            raise ConfigError(f"--dynamic_method {self.method} needs a positive --dynamic_param")
        if self.method in ("sv_fro", "sv_cumulative") and self.param > 1:
            raise ConfigError(f"--dynamic_param for {self.method} is a fraction in (0, 1], got {self.param}")


@dataclass(frozen=True)
class Kept:
    """What a chosen rank keeps: the share of the Frobenius norm (sqrt of the energy) and of the sum of singular
    values, and the ratio of the largest to the smallest kept singular value."""

    rank: int
    fro: float
    sum: float
    max_ratio: float


def spectrum_of_factors(up: torch.Tensor, down: torch.Tensor) -> Spectrum:
    """Exact SVD of up (out, R) @ down (R, in) in float64 through QR factors of both sides."""
    up, down = up.double(), down.double()
    q_up, r_up = torch.linalg.qr(up)  # (out, R), (R, R)
    q_down, r_down = torch.linalg.qr(down.T)  # (in, R), (R, R)
    u_core, s, vh_core = torch.linalg.svd(r_up @ r_down.T)
    return Spectrum(q_up @ u_core, s, vh_core @ q_down.T, float((s**2).sum()), True)


def spectrum_of_matrix(matrix: torch.Tensor, lowrank: int | None = None, niter: int = 2) -> Spectrum:
    """SVD of a full matrix: exact, or randomized with `lowrank` vectors (torch.svd_lowrank, `niter` power steps)."""
    matrix = matrix.float()
    energy = float(matrix.double().square().sum())
    if lowrank is not None and lowrank < min(matrix.shape):
        u, s, v = torch.svd_lowrank(matrix, q=lowrank, niter=niter)
        return Spectrum(u, s, v.T, energy, False)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return Spectrum(u, s, vh, energy, True)


def choose_rank(spectrum: Spectrum, rule: RankRule) -> int:
    """The smallest rank meeting the rule (at least 1, at most `max_rank` and the vectors there are):
    sv_ratio keeps the singular values at least S[0] / param; sv_fro the smallest rank whose share of the Frobenius
    norm reaches param; sv_cumulative the smallest rank whose share of the sum of singular values reaches param."""
    s = spectrum.s.double()
    limit = min(rule.max_rank, len(s))
    if len(s) == 0 or s[0] <= ZERO_SINGULAR_VALUE:
        return 1
    if rule.method is None:
        return limit
    if rule.method == "sv_ratio":
        rank = int((s >= s[0] / rule.param).sum())
    elif rule.method == "sv_fro":
        shares = (s.square().cumsum(0) / spectrum.energy).sqrt()
        rank = int((shares < rule.param - 1e-12).sum()) + 1
    else:
        if not spectrum.complete:
            raise ConfigError("--dynamic_method sv_cumulative needs every singular value: leave out --svd_lowrank")
        shares = s.cumsum(0) / s.sum()
        rank = int((shares < rule.param - 1e-12).sum()) + 1
    return max(1, min(rank, limit))


def kept(spectrum: Spectrum, rank: int) -> Kept:
    s = spectrum.s.double()
    fro = float((s[:rank].square().sum() / spectrum.energy).sqrt()) if spectrum.energy > 0 else 1.0
    total = float(s.sum())
    return Kept(rank, fro, float(s[:rank].sum()) / total if total > 0 else 1.0,
                float(s[0] / s[rank - 1]) if s[rank - 1] > 0 else float("inf"))  # fmt: skip


def factors(spectrum: Spectrum, rank: int, clamp_quantile: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """up = U S (out, rank) and down = Vh (rank, in) in float32; with `clamp_quantile` < 1 both are clamped to
    +-(that quantile of their values), the reference's outlier clamp of extracted LoRAs."""
    up = (spectrum.u[:, :rank] * spectrum.s[:rank]).float()
    down = spectrum.vh[:rank].float()
    if clamp_quantile is not None and clamp_quantile < 1:
        values = torch.cat([up.flatten(), down.flatten()])
        k = max(1, min(values.numel(), round(clamp_quantile * values.numel())))
        limit = float(values.kthvalue(k).values)
        up, down = up.clamp(-limit, limit), down.clamp(-limit, limit)
    return up, down


def relative_error(approximation: torch.Tensor, target: torch.Tensor) -> float:
    """||approximation - target||_F / ||target||_F (0 when both vanish)."""
    norm = float(target.double().norm())
    return float((approximation.double() - target.double()).norm()) / norm if norm > 0 else 0.0
