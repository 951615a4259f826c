"""The likelihood core on a transparent stand-in adapter: the noising maths, the draw order,
shared noise/timestep within a group, one forward over the batch."""

from contextlib import contextmanager

import pytest
import torch

from diffalign import elbo
from diffalign.elbo import denoising_errors, draw_noise_and_timesteps, policy_and_reference_errors


class LinearAdapter:
    """A DDPM-family adapter with a hand-made schedule: abar_t = (1 - t / T)^2, epsilon target."""

    prediction_type = "epsilon"
    num_train_timesteps = 1000
    alphas_cumprod = (1 - torch.arange(1000, dtype=torch.float32) / 1000) ** 2

    def predict(self, denoiser, xt, t, cond):
        return denoiser(xt, cond["emb"])


class FlowAdapter:
    prediction_type = "flow"
    num_train_timesteps = 1000
    logit_mean, logit_std = 0.0, 1.0


class CountingDenoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1)
        self.calls = []

    def forward(self, x, emb):
        self.calls.append(x.shape[0])
        return self.conv(x) + emb.view(-1, 1, 1, 1)


def test_draws_noise_then_timesteps_from_one_generator():
    """Noise first, as (n, 1, C, h, w), then t: the numbers the training loop has always drawn."""
    noise, t = draw_noise_and_timesteps(LinearAdapter(), (4, 8, 8), 3, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    expected_noise = torch.randn((3, 1, 4, 8, 8), generator=g, dtype=torch.float32)[:, 0]
    expected_t = torch.randint(0, 1000, (3,), generator=g)
    assert noise.shape == (3, 4, 8, 8) and torch.equal(noise, expected_noise)
    assert torch.equal(t, expected_t)
    _, sigma = draw_noise_and_timesteps(FlowAdapter(), (4, 8, 8), 3, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    torch.randn((3, 1, 4, 8, 8), generator=g)
    assert torch.equal(sigma, torch.sigmoid(torch.randn(3, generator=g)))


def test_ddpm_noise_and_targets_by_hand():
    adapter = LinearAdapter()
    x0, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t = torch.tensor([0, 600])
    a = (1 - t.float() / 1000).view(2, 1, 1, 1)  # sqrt(abar_t)
    s = (1 - a**2).sqrt()
    torch.testing.assert_close(elbo.add_noise(adapter, x0, noise, t), a * x0 + s * noise)
    assert torch.equal(elbo.target(adapter, x0, noise, t), noise)
    adapter.prediction_type = "v_prediction"
    torch.testing.assert_close(elbo.target(adapter, x0, noise, t), a * noise - s * x0)


def test_ddpm_noise_equals_diffusers_bit_for_bit():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
    adapter = LinearAdapter()
    adapter.prediction_type, adapter.alphas_cumprod = "v_prediction", scheduler.alphas_cumprod
    x0, noise, t = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5), torch.tensor([1, 500, 999])
    assert torch.equal(elbo.add_noise(adapter, x0, noise, t), scheduler.add_noise(x0, noise, t))
    assert torch.equal(elbo.target(adapter, x0, noise, t), scheduler.get_velocity(x0, noise, t))


def test_flow_interpolation_and_velocity():
    x0, noise = torch.full((2, 4, 2, 2), 3.0), torch.full((2, 4, 2, 2), -1.0)
    sigma = torch.tensor([0.25, 1.0])
    xt = elbo.add_noise(FlowAdapter(), x0, noise, sigma)
    assert torch.allclose(xt[0], torch.full((4, 2, 2), 0.75 * 3.0 + 0.25 * -1.0))
    assert torch.equal(xt[1], noise[1])  # sigma = 1 is pure noise
    assert torch.equal(elbo.target(FlowAdapter(), x0, noise, sigma), noise - x0)


def test_noise_and_timestep_shared_within_group():
    """Every image of a group is noised with its group's noise and t."""
    adapter = LinearAdapter()
    seen = []

    def record(denoiser, xt, t, cond):
        seen.append((xt, t))
        return xt

    adapter.predict = record
    latents = torch.zeros(3, 4, 4, 8, 8)  # x0 = 0: x_t is the scaled noise itself
    noise, t = draw_noise_and_timesteps(adapter, latents.shape[2:], 3, torch.Generator().manual_seed(0))
    denoising_errors(adapter, None, latents, {}, noise, t)
    xt, tt = seen[0]
    xt = xt.view(3, 4, 4, 8, 8)
    assert torch.equal(tt, t.repeat_interleave(4))
    for b in range(3):
        for k in range(1, 4):
            assert torch.equal(xt[b, k], xt[b, 0])
    assert not torch.equal(xt[0, 0], xt[1, 0])


def test_errors_equal_per_image_computation_and_one_forward():
    torch.manual_seed(0)
    adapter, model = LinearAdapter(), CountingDenoiser()
    latents = torch.randn(2, 3, 4, 8, 8)
    emb = torch.randn(6)
    noise, t = draw_noise_and_timesteps(adapter, latents.shape[2:], 2, torch.Generator().manual_seed(1))
    err = denoising_errors(adapter, model, latents, {"emb": emb}, noise, t)
    assert model.calls == [6]  # one forward over B*K
    assert err.shape == (2, 3) and err.dtype == torch.float32
    for b in range(2):
        for k in range(3):
            x0, eps = latents[b, k : k + 1], noise[b : b + 1]
            xt = elbo.add_noise(adapter, x0, eps, t[b : b + 1])
            pred = model.conv(xt) + emb[b * 3 + k]
            assert torch.allclose(err[b, k], (pred - eps).pow(2).mean(), atol=1e-6)


def test_reference_runs_without_grad_on_the_same_inputs():
    adapter, model = LinearAdapter(), CountingDenoiser()
    ref = CountingDenoiser()
    ref.load_state_dict(model.state_dict())

    @contextmanager
    def reference():
        yield ref

    latents = torch.randn(2, 2, 4, 8, 8)
    noise, t = draw_noise_and_timesteps(adapter, latents.shape[2:], 2, torch.Generator().manual_seed(0))
    err, ref_err = policy_and_reference_errors(adapter, model, latents, {"emb": torch.zeros(4)}, noise, t, reference)
    assert torch.allclose(err, ref_err)  # identical weights, identical noise and t
    assert err.requires_grad and not ref_err.requires_grad
    err, ref_err = policy_and_reference_errors(adapter, model, latents, {"emb": torch.zeros(4)}, noise, t, None)
    assert ref_err is None


@pytest.mark.parametrize("world", [2, 3])
def test_rows_of_the_global_draw_equal_the_single_process_batch(world):
    """The loop draws for the global batch and slices; each process's errors are the single
    process's rows (what makes N processes equal one)."""
    torch.manual_seed(0)
    adapter, model = LinearAdapter(), CountingDenoiser()
    latents, emb = torch.randn(6, 2, 4, 8, 8), torch.randn(12)
    noise, t = draw_noise_and_timesteps(adapter, latents.shape[2:], 6, torch.Generator().manual_seed(5))
    whole = denoising_errors(adapter, model, latents, {"emb": emb}, noise, t)
    per = 6 // world
    for rank in range(world):
        rows = slice(rank * per, (rank + 1) * per)
        part = denoising_errors(adapter, model, latents[rows], {"emb": emb[rows.start * 2 : rows.stop * 2]}, noise[rows], t[rows])
        torch.testing.assert_close(part, whole[rows])
