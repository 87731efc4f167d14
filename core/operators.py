"""Degradation operators y = A(x) + n for posterior-sampling restoration (DPS, PSLD, P2L, STSL;
../shared/papers/NOTES.md "Degradation operators").

Images are [B, C, H, W] tensors in [-1, 1]. Every operator provides ``A(x)``, its adjoint
``At(y, like)`` (``like`` gives the input shape) and ``noise(y, generator)`` adding its measurement
noise of level ``sigma_y``; for the nodes, the checked shape of the image behind a measurement
(:meth:`Operator.image_shape`), a view of itself as an image (:meth:`Operator.view`) and how well an
image explains a measurement (:meth:`Operator.consistency`). All are linear: <A x, y> = <x, A^T y>
(tested). Settings follow the papers: Gaussian blur 61x61 sigma 3, motion blur
61x61 intensity 0.5 (kernel drawn once from a seed), x4/x8 super-resolution, random inpainting
(40-70% of pixels), box and free-form masks (10-20% damage), 2% salt-and-pepper, Gaussian noise.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


class OperatorError(ValueError):
    """An operator does not fit its input; the message says how to fix it."""


class Operator:
    name = "identity"
    sigma_y: float = 0.0

    def A(self, x: Tensor) -> Tensor:
        return x

    def At(self, y: Tensor, like: Tensor) -> Tensor:
        return y

    def noise(self, y: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        if self.sigma_y <= 0:
            return y
        return y + self.sigma_y * torch.randn(y.shape, generator=generator, dtype=y.dtype).to(y.device)

    def measure(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return self.noise(self.A(x), generator)

    def x_shape(self, y_shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of the images x whose measurements have shape ``y_shape``."""
        return tuple(y_shape)

    def image_shape(self, y_shape: Sequence[int]) -> tuple[int, ...]:
        """:meth:`x_shape`, checked: A applied to a zero image of that shape must give ``y_shape``
        back (raises :class:`OperatorError` otherwise, or where A refuses the image)."""
        x_shape = self.x_shape(tuple(y_shape))
        if tuple(self.A(torch.zeros(x_shape)).shape) != tuple(y_shape):
            raise OperatorError(f"measurement: its size {tuple(y_shape[-2:])} does not match the operator.")
        return x_shape

    def view(self, x: Tensor) -> Tensor:
        """The operator as an image [B, 3, H, W] in [0, 1], for display: here A^T A x, what it keeps of
        the image ``x`` (3 channels); a blur shows its kernel and an inpainting its mask."""
        return (self.At(self.A(x), x).clamp(-1, 1) + 1.0) / 2.0

    def residual(self, y: Tensor, x: Tensor) -> Tensor:
        """||y - A x|| per image, [B] (differentiable): the data term of the posterior samplers."""
        return (y - self.A(x)).reshape(y.shape[0], -1).norm(dim=1)

    def consistency(self, y: Tensor, x: Tensor) -> dict[str, Optional[float]]:
        """How well the image ``x`` explains the measurement ``y``: ``residual``, the mean over images
        of ||y - A x||, and ``consistency``, that residual over the noise's expected norm
        sigma_y sqrt(m) (m the values of one measurement; about 1 where x is as consistent as the
        clean image; None without measurement noise)."""
        r = float(self.residual(y, x).mean())
        m = y[0].numel()
        return {"residual": r, "consistency": (r / (self.sigma_y * math.sqrt(m))) if self.sigma_y > 0 else None}

    def __call__(self, x: Tensor) -> Tensor:
        return self.A(x)


class GaussianNoise(Operator):
    """Denoising: A = I with additive Gaussian noise sigma_y (0.01 or 0.05 in [-1, 1] units)."""

    def __init__(self, sigma_y: float = 0.05):
        self.name, self.sigma_y = "gaussian_noise", float(sigma_y)


class SaltPepper(Operator):
    """Denoising of salt-and-pepper noise: A = I; a share ``p`` of pixels set to -1 or 1 (all channels)."""

    def __init__(self, p: float = 0.02):
        if not 0 <= p <= 1:
            raise OperatorError(f"amount: salt-and-pepper share must be in [0, 1], got {p}")
        self.name, self.p = "salt_pepper", float(p)

    def noise(self, y, generator=None):
        B, C, H, W = y.shape
        u = torch.rand((B, 1, H, W), generator=generator).to(y.device)
        s = torch.rand((B, 1, H, W), generator=generator).to(y.device) < 0.5
        hit = u < self.p
        val = torch.where(s, torch.ones_like(u), -torch.ones_like(u)).expand_as(y)
        return torch.where(hit.expand_as(y), val.to(y.dtype), y)


def _autograd_usable(t: Tensor) -> Tensor:
    """A tensor created under torch.inference_mode (as ComfyUI runs nodes) cannot be saved for
    backward; outside inference mode return an ordinary clone with the same values."""
    if t.is_inference() and not torch.is_inference_mode_enabled():
        return t.clone()
    return t


def _check_divisible(x: Tensor, factor: int, what: str) -> None:
    H, W = x.shape[-2:]
    if H % factor or W % factor:
        raise OperatorError(f"{what}: the image is {W}x{H}, which the scale factor {factor} does not divide; "
                            f"resize or crop it to a multiple of {factor} (e.g. {W - W % factor}x{H - H % factor}).")


class _Downscale(Operator):
    """Super-resolution operators: y is the image shrunk by an integer ``factor``."""

    kind = "sr"

    def __init__(self, factor: int = 4, sigma_y: float = 0.05):
        self.name, self.factor, self.sigma_y = f"{self.kind}_x{factor}", int(factor), float(sigma_y)

    def x_shape(self, y_shape):
        return (*y_shape[:-2], y_shape[-2] * self.factor, y_shape[-1] * self.factor)


class AvgPoolSR(_Downscale):
    """Super-resolution by average pooling (x4, x8); adjoint: nearest upsampling / factor^2."""

    kind = "sr_avgpool"

    def A(self, x):
        _check_divisible(x, self.factor, "image")
        return F.avg_pool2d(x, self.factor)

    def At(self, y, like):
        return F.interpolate(y, scale_factor=self.factor, mode="nearest") / (self.factor ** 2)


class BicubicSR(_Downscale):
    """Super-resolution by bicubic downsampling (a fixed linear map); its adjoint is computed exactly
    as the vector-Jacobian product of that map."""

    kind = "sr_bicubic"

    def A(self, x):
        _check_divisible(x, self.factor, "image")
        H, W = x.shape[-2:]
        return F.interpolate(x, size=(H // self.factor, W // self.factor), mode="bicubic", align_corners=False,
                             antialias=True)

    def At(self, y, like):
        with torch.inference_mode(False), torch.enable_grad():
            x = torch.zeros(like.shape, dtype=y.dtype, device=y.device, requires_grad=True)
            (g,) = torch.autograd.grad(self.A(x), x, grad_outputs=y)
        return g


class Blur(Operator):
    """Convolution with a fixed kernel (zero padding, same size); adjoint: correlation with the
    kernel, i.e. the transposed convolution."""

    def __init__(self, kernel: Tensor, name: str = "blur", sigma_y: float = 0.05):
        if kernel.ndim != 2 or kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
            raise OperatorError("kernel: must be a 2-D kernel of odd size")
        self.kernel = (kernel / kernel.sum()).float()
        self.name, self.sigma_y = name, float(sigma_y)

    def _w(self, x):
        C = x.shape[1]
        self.kernel = _autograd_usable(self.kernel)
        return self.kernel.to(x.device, x.dtype)[None, None].expand(C, 1, *self.kernel.shape)

    def A(self, x):
        ph, pw = self.kernel.shape[0] // 2, self.kernel.shape[1] // 2
        return F.conv2d(x, self._w(x), padding=(ph, pw), groups=x.shape[1])

    def At(self, y, like):
        ph, pw = self.kernel.shape[0] // 2, self.kernel.shape[1] // 2
        return F.conv_transpose2d(y, self._w(y), padding=(ph, pw), groups=y.shape[1])

    def view(self, x):
        """The kernel, scaled to a peak of 1, as one image [1, 3, k, k]."""
        k = self.kernel
        return (k / k.max())[None, None].expand(1, 3, *k.shape)


def gaussian_kernel(size: int = 61, sigma: float = 3.0) -> Tensor:
    r = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    k = g[:, None] * g[None, :]
    return (k / k.sum()).float()


def motion_kernel(size: int = 61, intensity: float = 0.5, seed: int = 0) -> Tensor:
    """A random camera-shake kernel: a 2-D random walk with momentum whose turning and jitter grow
    with ``intensity`` (0 = a straight line, 1 = a tangled path), spanning about the kernel's size,
    splatted bilinearly and normalised to sum 1. Drawn once from ``seed``."""
    if not 0.0 <= intensity <= 1.0:
        raise OperatorError(f"intensity: must be in [0, 1], got {intensity}")
    g = torch.Generator().manual_seed(int(seed))
    steps = 4 * size
    angle = float(torch.rand((), generator=g)) * 2 * math.pi
    vel = torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)
    pos = torch.zeros(2, dtype=torch.float64)
    pts = [pos.clone()]
    for _ in range(steps):
        turn = torch.randn(2, generator=g, dtype=torch.float64) * (0.05 + 0.6 * intensity)
        if float(torch.rand((), generator=g)) < 0.02 * intensity:  # occasional jerk
            turn = turn * 8
        vel = vel + turn
        vel = vel / vel.norm().clamp_min(1e-8)
        pos = pos + vel
        pts.append(pos.clone())
    P = torch.stack(pts)
    P = P - (P.max(0).values + P.min(0).values) / 2
    extent = float((P.max(0).values - P.min(0).values).max())
    P = P * ((size - 3) / max(extent, 1e-8)) + size // 2
    k = torch.zeros(size, size, dtype=torch.float64)
    for x, y in P.tolist():
        x0, y0 = int(math.floor(x)), int(math.floor(y))
        fx, fy = x - x0, y - y0
        for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
            if 0 <= y0 + dy < size and 0 <= x0 + dx < size:
                k[y0 + dy, x0 + dx] += w
    return (k / k.sum()).float()


class Inpaint(Operator):
    """Inpainting: A = M (elementwise mask, 1 = observed), self-adjoint."""

    def __init__(self, mask: Tensor, name: str = "inpaint", sigma_y: float = 0.0):
        if mask.ndim == 2:
            mask = mask[None, None]
        elif mask.ndim == 3:
            mask = mask[:, None]
        self.mask = mask.float()
        self.name, self.sigma_y = name, float(sigma_y)

    def mask_like(self, x: Tensor) -> Tensor:
        """The mask (1 = observed) for the image batch ``x``, on its device and in its dtype; raises
        :class:`OperatorError` where it does not fit ``x``."""
        self.mask = _autograd_usable(self.mask)
        m = self.mask.to(x.device, x.dtype)
        if m.shape[-2:] != x.shape[-2:]:
            raise OperatorError(f"mask: the mask is {m.shape[-1]}x{m.shape[-2]} but the image is "
                                f"{x.shape[-1]}x{x.shape[-2]}; resize the mask to the image.")
        if m.shape[0] not in (1, x.shape[0]):
            raise OperatorError(f"mask: mask batch {m.shape[0]} must be 1 or the image batch {x.shape[0]}.")
        return m

    def A(self, x):
        return x * self.mask_like(x)

    def At(self, y, like):
        return y * self.mask_like(y)

    def view(self, x):
        """The mask for ``x`` (white = observed) as images [B, 3, H, W]."""
        return self.mask_like(x)[:, :1].expand(-1, 3, -1, -1)


def random_mask(H: int, W: int, drop: float = 0.4, seed: int = 0) -> Tensor:
    """Observe each pixel with probability 1 - drop (the papers drop 40-70%)."""
    g = torch.Generator().manual_seed(int(seed))
    return (torch.rand((H, W), generator=g) >= drop).float()


def box_mask(H: int, W: int, box: float = 0.5, seed: Optional[int] = None) -> Tensor:
    """Hide a square of side ``box`` * min(H, W): centred, or at a seeded random place."""
    s = max(1, int(round(box * min(H, W))))
    if seed is None:
        top, left = (H - s) // 2, (W - s) // 2
    else:
        g = torch.Generator().manual_seed(int(seed))
        top = int(torch.randint(0, H - s + 1, (), generator=g))
        left = int(torch.randint(0, W - s + 1, (), generator=g))
    m = torch.ones(H, W)
    m[top:top + s, left:left + s] = 0
    return m


def freeform_mask(H: int, W: int, damage: tuple[float, float] = (0.1, 0.2), seed: int = 0) -> Tensor:
    """Random brush strokes until the hidden share lies in ``damage`` (10-20% as in the papers)."""
    g = torch.Generator().manual_seed(int(seed))
    target = damage[0] + (damage[1] - damage[0]) * float(torch.rand((), generator=g))
    m = torch.ones(H, W)
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    width = max(2.0, 0.04 * min(H, W))
    for _ in range(200):
        if 1 - float(m.mean()) >= target:
            break
        y, x = float(torch.rand((), generator=g)) * H, float(torch.rand((), generator=g)) * W
        for _ in range(int(torch.randint(3, 8, (), generator=g))):
            a = float(torch.rand((), generator=g)) * 2 * math.pi
            length = (0.05 + 0.15 * float(torch.rand((), generator=g))) * min(H, W)
            y2, x2 = y + length * math.sin(a), x + length * math.cos(a)
            # distance from each pixel to the segment (x, y) - (x2, y2)
            dx, dy = x2 - x, y2 - y
            t = (((xx - x) * dx + (yy - y) * dy) / max(dx * dx + dy * dy, 1e-8)).clamp(0, 1)
            d2 = (xx - (x + t * dx)) ** 2 + (yy - (y + t * dy)) ** 2
            m[d2 <= (width / 2) ** 2] = 0
            y, x = min(max(y2, 0), H - 1), min(max(x2, 0), W - 1)
            if 1 - float(m.mean()) >= target:
                break
    return m


class LazyMaskInpaint(Inpaint):
    """Inpainting whose generated mask (random, box, free-form) is drawn for the size of the first
    image it sees, from a fixed seed: the same operator fits any image size."""

    def __init__(self, kind: str, seed: int = 0, drop: float = 0.4, box: float = 0.5,
                 damage: tuple[float, float] = (0.1, 0.2), sigma_y: float = 0.0):
        if kind not in ("random", "box", "freeform"):
            raise OperatorError(f"mask kind must be random, box or freeform, got {kind!r}")
        self.kind, self.seed, self.drop, self.box, self.damage = kind, int(seed), float(drop), float(box), damage
        self.name, self.sigma_y = f"inpaint_{kind}", float(sigma_y)
        self.mask = torch.ones(1, 1, 1, 1)
        self._size = None

    def mask_for(self, H: int, W: int) -> Tensor:
        if self._size != (H, W):
            if self.kind == "random":
                m = random_mask(H, W, self.drop, self.seed)
            elif self.kind == "box":
                m = box_mask(H, W, self.box, None)
            else:
                m = freeform_mask(H, W, self.damage, self.seed)
            self.mask, self._size = m[None, None], (H, W)
        return self.mask

    def mask_like(self, x):
        self.mask_for(*x.shape[-2:])
        return super().mask_like(x)
