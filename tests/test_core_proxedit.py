"""Proximal guidance (core/proxedit.py) against closed forms and its defining properties."""
import math

import pytest
import torch

from comfyui_inverse.core import attention_control as ac
from comfyui_inverse.core import ddim, flow, inversion, proxedit, schedule
from comfyui_inverse.core.reference import GaussianMixtureDenoiser, MixturePrior
from comfyui_inverse.core.result import InversionResult
from support.core_models import mixture_reference, toy_inversion


def test_prox_operators_match_their_closed_forms():
    d = torch.tensor([[-3.0, -1.0, -0.2, 0.0, 0.5, 2.0]])
    thr = torch.tensor([[1.0]])
    assert torch.equal(proxedit.prox_hard(d, thr), torch.tensor([[-3.0, 0.0, 0.0, 0.0, 0.0, 2.0]]))
    assert torch.equal(proxedit.prox_soft(d, thr), torch.tensor([[-2.0, 0.0, 0.0, 0.0, 0.0, 1.0]]))
    # the l1 prox is argmin_x 0.5 (x - d)^2 + thr |x|; the l0 prox argmin 0.5 (x - d)^2 + thr^2/2 [x != 0]
    xs = torch.cat([torch.linspace(-4, 4, 80001), torch.zeros(1)])[:, None]
    for j in range(d.shape[1]):
        l1 = 0.5 * (xs - d[0, j]) ** 2 + xs.abs()
        assert float(xs[l1.argmin()]) == pytest.approx(float(proxedit.prox_soft(d, thr)[0, j]), abs=1e-3)
        l0 = 0.5 * (xs - d[0, j]) ** 2 + 0.5 * (xs != 0)
        if abs(abs(float(d[0, j])) - 1.0) > 1e-6:
            assert float(xs[l0.argmin()]) == pytest.approx(float(proxedit.prox_hard(d, thr)[0, j]), abs=1e-3)


def test_quantile_threshold_is_per_image_and_keeps_the_right_share():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(2, 4, 16, 16, generator=g) * torch.tensor([1.0, 10.0])[:, None, None, None]
    thr = proxedit.quantile_threshold(d, 0.7)
    assert thr.shape == (2, 1, 1, 1) and float(thr[1]) == pytest.approx(10 * float(thr[0]), rel=0.3)
    kept = (proxedit.prox_hard(d, thr) != 0).float().mean(dim=(1, 2, 3))
    assert torch.allclose(kept, torch.tensor([0.3, 0.3]), atol=0.01)
    assert torch.equal(proxedit.prox_hard(d, proxedit.quantile_threshold(d, 1.0)), torch.zeros_like(d))


def test_edit_mask_dilation():
    d = torch.zeros(1, 1, 7, 7)
    d[0, 0, 3, 3] = 5.0
    m = proxedit.edit_mask(d, torch.tensor(1.0), radius=1)
    assert int(m.sum()) == 9 and float(m[0, 0, 2:5, 2:5].min()) == 1.0
    assert int(proxedit.edit_mask(d, torch.tensor(1.0), radius=0).sum()) == 1


def test_slerp_endpoints_and_norm():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(proxedit.slerp(0.0, a, b), a) and torch.allclose(proxedit.slerp(1.0, a, b), b)
    assert float(proxedit.slerp(0.5, a, b).norm()) == pytest.approx(1.0, abs=1e-6)


def test_slerp_is_per_image():
    """Review defect 2: one angle over the whole flattened batch coupled the images."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 77, 32, generator=g), torch.randn(2, 77, 32, generator=g)
    both = proxedit.slerp(0.3, a, b)
    for i in range(2):
        assert torch.allclose(both[i:i + 1], proxedit.slerp(0.3, a[i:i + 1], b[i:i + 1]), atol=1e-6)
    assert torch.allclose(proxedit.slerp(0.3, a, b[:1]), torch.cat([proxedit.slerp(0.3, a[i:i + 1], b[:1])
                                                                      for i in range(2)]), atol=1e-6)


def _setup(steps=20):
    model, ac, z0 = mixture_reference(components=1)
    from comfyui_inverse.core.reference import MixturePrior

    shift = torch.randn(model.priors["c"].means[0].shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    model.priors["t"] = MixturePrior.gaussian(model.priors["c"].means[0] + 0.8 * shift, 0.7)  # the "target prompt"
    grid = schedule.TimestepGrid.from_schedule(ac, schedule.timestep_spacing(steps, steps_offset=1))
    return model, grid, z0


@pytest.mark.parametrize("prox", ["hard", "soft"])
def test_threshold_at_maximum_reproduces_the_npi_reconstruction_exactly(prox):
    model, grid, z0 = _setup()
    traj = ddim.ddim_invert(model, z0, grid, "c").trajectory
    res = InversionResult(traj, grid, "npi", 1.0)
    rec = ddim.ddim_sample(model, traj[-1], grid, "c")[-1]
    cfg = proxedit.ProxConfig(guidance=7.5, prox=prox, quantile=1.0)
    edit = proxedit.prox_edit(model, res, "c", "t", cfg)[-1]
    assert torch.equal(edit, rec)
    # a real edit (lower quantile) moves away from it
    edit2 = proxedit.prox_edit(model, res, "c", "t", proxedit.ProxConfig(guidance=7.5, prox=prox, quantile=0.5))[-1]
    assert ddim.reconstruction_rmse(edit2, rec) > 1e-3


def test_threshold_at_maximum_over_ddpm_inversion_reconstructs_the_input():
    model, grid, z0 = _setup()
    res = inversion.ddpm_invert(model, z0, grid, "c", generator=torch.Generator().manual_seed(0))
    xs, maps = res.trajectory, res.extras["noise_maps"]
    res = InversionResult(xs, grid, "ddpm", 1.0, {"noise_maps": maps})
    edit = proxedit.prox_edit(model, res, "c", "t", proxedit.ProxConfig(quantile=1.0))[-1]
    assert ddim.reconstruction_rmse(edit, z0) < 1e-5


def test_share_of_changed_latent_grows_as_the_quantile_falls():
    model, grid, z0 = _setup()
    traj = ddim.ddim_invert(model, z0, grid, "c").trajectory
    res = InversionResult(traj, grid, "npi", 1.0)
    rec = ddim.ddim_sample(model, traj[-1], grid, "c")[-1]
    shares = []
    for q in (0.95, 0.8, 0.5):
        e = proxedit.prox_edit(model, res, "c", "t", proxedit.ProxConfig(quantile=q, dilation=0))[-1]
        shares.append(float(((e - rec).abs() > 1e-3).float().mean()))
    assert shares[0] < shares[1] < shares[2]


def test_inversion_guidance_pulls_the_unedited_region_to_the_trajectory():
    model, grid, z0 = _setup()
    traj = ddim.ddim_invert(model, z0, grid, "c").trajectory
    res = InversionResult(traj, grid, "ddim", 1.0)
    base = proxedit.ProxConfig(guidance=7.5, quantile=0.8, rec_abar=0.0)  # every step
    free = proxedit.prox_edit(model, res, "u", "t", base)[-1]
    pulled = proxedit.prox_edit(model, res, "u", "t", proxedit.ProxConfig(**{**base.__dict__, "inversion_guidance": 1.0}))[-1]
    recg = proxedit.prox_edit(model, res, "u", "t", proxedit.ProxConfig(**{**base.__dict__, "reconstruction_guidance": 0.5}))[-1]
    assert ddim.reconstruction_rmse(pulled, z0) < ddim.reconstruction_rmse(free, z0)
    assert ddim.reconstruction_rmse(recg, z0) < ddim.reconstruction_rmse(free, z0)


def test_one_predictor_call_per_step():
    model, grid, z0 = _setup(10)
    traj = ddim.ddim_invert(model, z0, grid, "c").trajectory
    model.calls = model.evaluations = 0
    proxedit.prox_edit(model, InversionResult(traj, grid, "npi", 1.0), "c", "t", proxedit.ProxConfig())
    assert (model.calls, model.evaluations) == (10, 20)


# ------------------------------------------------------------------------------------------------
# issue 20: T_rec is a noise level (SD's timestep t_rec's abar), not an index into the model's table


def _flow_abar(s: torch.Tensor) -> torch.Tensor:
    """abar of flow time s: sigma = s / (1 - s), abar = 1 / (1 + sigma^2) = (1 - s)^2 / ((1 - s)^2 + s^2)."""
    return (1 - s) ** 2 / ((1 - s) ** 2 + s ** 2)


def _family_table(family: str) -> torch.Tensor:
    """abar of every usable model timestep, as nodes/comfy/ builds it: SD1.5's 1000-level
    scaled-linear table; SD3's discrete flow (shift 3, 1000 levels); Flux's (mu 1.15, 10,000 levels,
    ComfyUI's ModelSamplingFlux); the flow tables capped at s <= 0.99."""
    if family == "sd15":
        return schedule.scaled_linear_alphas_cumprod()
    if family == "sd3":
        return schedule.alphas_cumprod_from_sigmas(flow.discrete_flow_sigmas(3.0))
    u = torch.arange(1, 10001, dtype=torch.float64) / 10000
    s = math.exp(1.15) / (math.exp(1.15) + (1 / u - 1))
    return _flow_abar(s[s <= 0.99])


def _family_grid(family: str, steps: int) -> schedule.TimestepGrid:
    """The glue's default grid: SD's leading spacing (offset 1), the flow models' trailing."""
    table = _family_table(family)
    spacing, offset = ("leading", 1) if family == "sd15" else ("trailing", 0)
    return schedule.TimestepGrid.from_schedule(table, schedule.timestep_spacing(steps, len(table), spacing, offset))


def _guided_steps(family: str, steps: int, cfg: proxedit.ProxConfig) -> list[int]:
    """The steps of the family's ``steps``-step grid at which inversion guidance acts, observed: with
    the threshold at its maximum the edit mask is empty, so eta = 1 puts a guided step exactly on the
    stored trajectory, while an unguided one, sampling with another prompt ("u") than the
    inversion's ("c"), leaves it."""
    table, grid = _family_table(family), _family_grid(family, steps)
    g = torch.Generator().manual_seed(4)
    shape = (1, 4, 8, 8)
    priors = {"c": MixturePrior.gaussian(torch.randn(shape[1:], generator=g, dtype=torch.float64), 0.7),
              "u": MixturePrior.gaussian(torch.randn(shape[1:], generator=g, dtype=torch.float64), 0.7)}
    priors["t"] = priors["u"]
    model = GaussianMixtureDenoiser(priors, table)
    z0 = priors["c"].means[0][None].float() + 0.5 * torch.randn(shape, generator=g)
    res = InversionResult(ddim.ddim_invert(model, z0, grid, "c").trajectory, grid, "ddim", 1.0)
    keep = res.trajectory[::-1]
    cfg = proxedit.ProxConfig(**{**cfg.__dict__, "quantile": 1.0, "inversion_guidance": 1.0})
    traj = proxedit.prox_edit(model, res, "u", "t", cfg)
    landed = [float((traj[i + 1] - keep[i + 1]).abs().max()) for i in range(grid.steps)]
    assert all(d < 1e-5 or d > 1e-3 for d in landed), landed   # each step is clearly one or the other
    return [i for i, d in enumerate(landed) if d < 1e-5]


def _flow_time(abar: float) -> float:
    sigma = math.sqrt((1.0 - abar) / abar)
    return sigma / (1.0 + sigma)


def test_t_rec_as_a_noise_level_keeps_every_sd_timestep_comparison():
    """SD1.5 is unchanged: on SD's table abar_u > sd_equivalent_abar(t_rec) exactly when u < t_rec,
    for every timestep u and t_rec 0..1000, in float64 and through float32 sigmas (as ComfyUI holds
    them). The paper's 400 is abar 0.425, flow time 0.538."""
    table = schedule.scaled_linear_alphas_cumprod()
    comfy = schedule.alphas_cumprod_from_sigmas(((1 - table.float()) / table.float()).sqrt())
    thr = torch.tensor([proxedit.sd_equivalent_abar(t) for t in range(1001)], dtype=torch.float64)
    want = torch.arange(1000)[:, None] < torch.arange(1001)[None]
    for ab in (table, comfy):
        assert torch.equal(ab[:, None] > thr[None], want)
    assert proxedit.sd_equivalent_abar(0) == 1.0 and proxedit.sd_equivalent_abar(1000) == 0.0
    assert proxedit.ProxConfig().rec_abar == proxedit.sd_equivalent_abar(400) == pytest.approx(0.4253, abs=1e-4)
    assert _flow_time(proxedit.sd_equivalent_abar(400)) == pytest.approx(0.538, abs=1e-3)


@pytest.mark.parametrize("family, count", [("sd15", 12), ("sd3", 8), ("flux", 7)])
def test_the_default_t_rec_guides_the_same_noise_levels_on_every_family(family, count):
    """Issue 20: "t < 400" counted on each model's own table: SD3's 1000 levels (11 of 28 steps
    guided, down to flow time 0.4 x shift), Flux's 10,000 (1 of 28: only s < 0.117). As SD's noise
    level at t = 400 the default guides the steps below abar 0.425 on every family: 12 of SD's 28
    steps (unchanged: exactly its t < 400), 8 of SD3's and 7 of Flux's (their flow time s < 0.538;
    flow schedules are shifted toward high noise, so fewer of their steps lie below that level)."""
    grid = _family_grid(family, 28)
    guided = _guided_steps(family, 28, proxedit.ProxConfig())
    level = proxedit.sd_equivalent_abar(400)
    assert guided == [i for i in range(grid.steps) if grid.alphas_cumprod[i] > level]
    assert len(guided) == count and guided == list(range(grid.steps - count, grid.steps))
    if family == "sd15":
        assert guided == [i for i, t in enumerate(grid.timesteps[:-1]) if t < 400]
    else:
        s = [_flow_time(a) for a in grid.alphas_cumprod[:-1]]
        assert max(s[i] for i in guided) < 0.538 < min(s[i] for i in range(grid.steps) if i not in guided)
    # 0 and 1000 still mean never and every step, on every family
    assert _guided_steps(family, 28, proxedit.ProxConfig(rec_abar=proxedit.sd_equivalent_abar(0))) == []
    assert _guided_steps(family, 28, proxedit.ProxConfig(rec_abar=proxedit.sd_equivalent_abar(1000))) == \
        list(range(28))


class _CountingPredictor:
    """A predictor that records how many conditioning branches each call evaluates."""

    def __init__(self, model):
        self.model, self.batches = model, []

    def __call__(self, z, t, conds):
        self.batches.append(len(conds))
        return self.model(z, t, conds)


def test_prox_npi_with_masactrl_on_the_base_evaluates_the_source_once_per_step():
    """Issue 20 (wasted capture): with the source prompt as the base (Prox-NPI) and MasaCtrl's
    base_strategy "source", the capture call evaluated [source, base] = the source prompt on the
    stored latent twice. Now once, its keys/values serving both branches: 3 evaluations per
    controlled step instead of 4, and the same edit (the same embedding under a second handle still
    takes the old two-branch path)."""
    model, res, _ = toy_inversion(steps=10)
    masa = ac.MutualSelfAttention(start_step=2, start_layer=0)
    assert masa.base_strategy == "source"
    cfg = proxedit.ProxConfig(guidance=7.5, quantile=0.5)

    def edit(base):
        model.controller = ctl = ac.AttentionController(ac.AttentionControl(masactrl=masa), 10)
        counting = _CountingPredictor(model)
        out = proxedit.prox_edit(counting, res, base, "tar", cfg, control=ctl, source="src")[-1]
        return out, counting.batches

    shared, batches = edit("src")
    twice, before = edit("same")   # "same" holds the source's embedding under another handle
    assert batches == [2, 2] + [1, 2] * 8          # steps 0-1 uncontrolled; then capture [source], [base, tar]
    assert before == [2, 2] + [2, 2] * 8           # capture [source, base]
    assert (sum(batches), sum(before)) == (28, 36)
    assert float((shared - twice).abs().max()) < 1e-6
    model.controller = None
    assert float((shared - proxedit.prox_edit(model, res, "src", "tar", cfg)[-1]).abs().max()) > 1e-3
