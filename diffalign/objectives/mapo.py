"""MaPO: margin-aware preference optimisation (Hong et al., 2024, arXiv:2406.06424).

Reference-free: no reference model and no second forward. As in mapo-t2i/mapo `compute_loss`:

    f(x)     = s*x / (exp(s*x) - 1)          bounded, decreasing score of an error, f(0) = 1
    log_odds = f(err_w) - f(err_l)
    loss     = err_w - beta * log sigmoid(T * log_odds)

The first term is plain diffusion likelihood on the chosen image (weight 1); the second raises
the margin between chosen and rejected. Multiplying by T (num_train_timesteps) spreads the
margin over the whole denoising process. Paper defaults: beta = 0.1, s = 0.5, lr 1e-5 on SDXL.
"""

from __future__ import annotations

from diffalign.lazy import lazy
from diffalign.objectives.dpo import pair_metrics

torch = lazy("torch")  # loads on first use: `diffalign train` checks its options before torch loads
F = lazy("torch.nn.functional")

NEEDS_REF = False
DATA = "pairs"
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")


# Checked before any model loads (diffalign.objectives.check_hparams).
CHOICES = {}
POSITIVE = ("beta", "snr_value")

def default_hparams(prediction_type: str) -> dict:
    return {"beta": 0.1, "snr_value": 0.5}


def bounded_score(err: torch.Tensor, snr_value: float) -> torch.Tensor:
    """s*x / (exp(s*x) - 1), with the removable singularity at 0 set to its limit 1."""
    sx = snr_value * err
    safe = torch.where(sx.abs() < 1e-12, torch.full_like(sx, 1e-12), sx)
    return torch.where(sx.abs() < 1e-12, torch.ones_like(sx), safe / torch.expm1(safe))


def loss(
    err: torch.Tensor,
    ref_err: torch.Tensor | None = None,
    *,
    scores: torch.Tensor | None = None,
    num_timesteps: int = 1000,
    beta: float = 0.1,
    snr_value: float = 0.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair MaPO loss. err: (B, 2), winner first. Returns (B,) and metrics."""
    err_w, err_l = err[:, 0], err[:, 1]
    log_odds = bounded_score(err_w, snr_value) - bounded_score(err_l, snr_value)
    margin = num_timesteps * log_odds
    losses = err_w - beta * F.logsigmoid(margin)
    return losses, pair_metrics(err, None, margin)
