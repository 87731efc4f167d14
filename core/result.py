"""The inversion family's one result type, returned by every inversion in core/ (DDIM, the exact
solvers, null-text, edit-friendly DDPM) and carried between nodes (the INVERSE_INVERSION socket)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .schedule import TimestepGrid

Tensor = torch.Tensor


@dataclass
class StepReport:
    """Per-step diagnostics of an iterative inversion (empty for the one-pass inversions)."""

    residuals: list[float] = field(default_factory=list)   # mean over images of mean|z - f(z)| of the returned latent
    iterations: list[int] = field(default_factory=list)    # updates made per step
    history: list[list[float]] = field(default_factory=list)  # mean residual of every evaluated iterate, per step


@dataclass
class InversionResult:
    """What an inversion produced, in the model's DDPM latent space (after the model's latent
    format was applied), float32; on the model's device as core/ returns it, on the CPU as the
    nodes pass it on (:meth:`to`).

    ``trajectory[i]`` is the latent at level ``grid.timesteps[::-1][i]``: ``trajectory[0]`` is the
    clean latent z_0 that was inverted and ``trajectory[-1]`` the final noise latent z_T.
    ``report`` holds the per-step residuals of the exact solvers; ``extras`` carries method-specific
    state (null embeddings, noise maps, model calls, the prompts the nodes attach).
    """

    trajectory: list[Tensor]
    grid: TimestepGrid
    method: str = "ddim"
    guidance: float = 1.0
    extras: dict[str, Any] = field(default_factory=dict)
    report: StepReport = field(default_factory=StepReport)

    def __post_init__(self):
        if len(self.trajectory) != len(self.grid.timesteps):
            raise ValueError(f"trajectory has {len(self.trajectory)} latents for a grid of "
                             f"{len(self.grid.timesteps)} levels")

    @property
    def z0(self) -> Tensor:
        return self.trajectory[0]

    @property
    def noise_latent(self) -> Tensor:
        return self.trajectory[-1]

    @property
    def batch_size(self) -> int:
        return int(self.z0.shape[0])

    def to(self, device) -> "InversionResult":
        """A detached copy whose trajectory and per-step tensors (noise maps, null embeddings) live on
        ``device`` in their own dtypes (the noise maps stay float64); other extras (e.g. host
        conditionings) are shared."""
        extras = dict(self.extras)
        for key in ("noise_maps", "null_embeddings"):
            if key in extras:
                extras[key] = [t.detach().to(device) for t in extras[key]]
        return InversionResult([z.detach().float().to(device) for z in self.trajectory], self.grid, self.method,
                               self.guidance, extras, self.report)
