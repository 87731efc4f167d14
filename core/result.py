"""The inversion result carried between nodes (the INVERSE_INVERSION socket)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .schedule import TimestepGrid

Tensor = torch.Tensor


@dataclass
class InversionResult:
    """What an inversion produced, in the model's DDPM latent space (after the model's latent
    format was applied), float32 on the CPU.

    ``trajectory[i]`` is the latent at level ``grid.timesteps[::-1][i]``: ``trajectory[0]`` is the
    clean latent z_0 that was inverted and ``trajectory[-1]`` the final noise latent z_T.
    ``extras`` carries method-specific state (per-step residuals, null embeddings, noise maps).
    """

    trajectory: list[Tensor]
    grid: TimestepGrid
    method: str = "ddim"
    guidance: float = 1.0
    extras: dict[str, Any] = field(default_factory=dict)

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
        """A copy whose trajectory and per-step tensors (noise maps, null embeddings) live on ``device``;
        other extras (e.g. host conditionings) are shared."""
        extras = dict(self.extras)
        for key in ("noise_maps", "null_embeddings"):
            if key in extras:
                extras[key] = [t.to(device) for t in extras[key]]
        return InversionResult([z.to(device) for z in self.trajectory], self.grid, self.method, self.guidance, extras)
