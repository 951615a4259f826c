"""The likelihood core on a transparent stand-in adapter: shared noise/timestep, one forward."""

import torch

from diffalign.elbo import denoising_errors, policy_and_reference_errors, shared_noise_and_timesteps


class LinearAdapter:
    """x_t = a(t) x0 + s(t) noise, epsilon target; just enough of the adapter contract."""

    num_train_timesteps = 1000

    def sample_timesteps(self, n, generator):
        return torch.randint(0, 1000, (n,), generator=generator)

    def _coef(self, t):
        a = (1 - t.float() / 1000).view(-1, 1, 1, 1)
        return a, (1 - a**2).sqrt()

    def add_noise(self, x0, noise, t):
        a, s = self._coef(t)
        return a * x0 + s * noise

    def target(self, x0, noise, t):
        return noise

    def predict(self, denoiser, xt, t, cond):
        return denoiser(xt, cond["emb"])


class CountingDenoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1)
        self.calls = []

    def forward(self, x, emb):
        self.calls.append(x.shape[0])
        return self.conv(x) + emb.view(-1, 1, 1, 1)


def test_noise_and_timestep_shared_within_group():
    latents = torch.randn(3, 4, 4, 8, 8)
    noise, t = shared_noise_and_timesteps(LinearAdapter(), latents, torch.Generator().manual_seed(0))
    assert t.shape == (3,)
    for b in range(3):
        for k in range(1, 4):
            assert torch.equal(noise[b, k], noise[b, 0])
    assert not torch.equal(noise[0, 0], noise[1, 0])


def test_errors_equal_per_image_computation_and_one_forward():
    torch.manual_seed(0)
    adapter, model = LinearAdapter(), CountingDenoiser()
    latents = torch.randn(2, 3, 4, 8, 8)
    emb = torch.randn(6)
    noise, t = shared_noise_and_timesteps(adapter, latents, torch.Generator().manual_seed(1))
    err = denoising_errors(adapter, model, latents, {"emb": emb}, noise, t)
    assert model.calls == [6]  # one forward over B*K
    assert err.shape == (2, 3) and err.dtype == torch.float32
    for b in range(2):
        for k in range(3):
            x0, eps = latents[b, k : k + 1], noise[b, k : k + 1]
            xt = adapter.add_noise(x0, eps, t[b : b + 1])
            pred = model.conv(xt) + emb[b * 3 + k]
            assert torch.allclose(err[b, k], (pred - eps).pow(2).mean(), atol=1e-6)


def test_reference_runs_without_grad_on_the_same_inputs():
    adapter, model = LinearAdapter(), CountingDenoiser()
    ref = CountingDenoiser()
    ref.load_state_dict(model.state_dict())
    from contextlib import contextmanager

    @contextmanager
    def reference():
        yield ref

    latents = torch.randn(2, 2, 4, 8, 8)
    err, ref_err, _ = policy_and_reference_errors(
        adapter, model, latents, {"emb": torch.zeros(4)}, torch.Generator().manual_seed(0), reference
    )
    assert torch.allclose(err, ref_err)  # identical weights, identical noise and t
    assert err.requires_grad and not ref_err.requires_grad
