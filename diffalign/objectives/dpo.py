"""Diffusion-DPO (Wallace et al., 2023, arXiv:2311.12908), Eq. 14 of the paper.

β convention (one for all of diffalign, the original code's form):

    inside = -0.5 * beta * ((err_w - ref_err_w) - (err_l - ref_err_l))
    loss   = -log sigmoid(inside)

`err` is the per-image mean squared denoising error (mean over C, H, W). The 0.5 comes from the
Gaussian log-likelihood; T and the timestep weighting are folded into beta. Published settings
in this convention: SD1.5/SDXL beta = 5000 (SalesforceAIResearch/DiffusionDPO; diffusers'
SD1.5 script writes the same loss as beta_dpo = 2500 without the 0.5), DCPO on SD2.1 beta = 500,
Flow-DPO on SD3.5 beta = 100 (velocity errors are O(1), so a much smaller beta).

Variants (`loss_type`): "sigmoid" (the paper), "hinge" relu(1 - inside), and "ipo"
(logits - 1/beta)^2 with logits = -(model_diff - ref_diff), as in diffusers' research script
with its beta_dpo = beta / 2.
"""

from __future__ import annotations

from diffalign.lazy import lazy

torch = lazy("torch")  # loads on first use: `diffalign train` checks its options before torch loads
F = lazy("torch.nn.functional")

NEEDS_REF = True
DATA = "pairs"
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")

# Per prediction type, in the convention above.
DEFAULT_BETA = {"epsilon": 5000.0, "v_prediction": 5000.0, "flow": 100.0}
LOSS_TYPES = ("sigmoid", "hinge", "ipo")


# Checked before any model loads (diffalign.objectives.check_hparams).
CHOICES = {"loss_type": LOSS_TYPES}
POSITIVE = ("beta",)

def default_hparams(prediction_type: str) -> dict:
    return {"beta": DEFAULT_BETA[prediction_type], "loss_type": "sigmoid"}


def pair_logits(err: torch.Tensor, ref_err: torch.Tensor) -> torch.Tensor:
    """(ref_diff - model_diff) for the winner (column 0) against the loser (column 1): (B,).

    Positive when the policy has moved towards the winner, relative to the reference.
    """
    model_diff = err[:, 0] - err[:, 1]
    ref_diff = ref_err[:, 0] - ref_err[:, 1]
    return ref_diff - model_diff


def loss(
    err: torch.Tensor,
    ref_err: torch.Tensor,
    *,
    scores: torch.Tensor | None = None,
    num_timesteps: int = 1000,
    beta: float = 5000.0,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair Diffusion-DPO loss. err, ref_err: (B, 2), winner first. Returns (B,) and metrics."""
    if ref_err is None:
        raise ValueError("Diffusion-DPO needs the reference model's errors (ref_err)")
    logits = pair_logits(err, ref_err)  # (B,)
    inside = 0.5 * beta * logits
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(inside)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - inside)
    elif loss_type == "ipo":
        losses = (logits - 1.0 / beta) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
    return losses, pair_metrics(err, ref_err, inside)


def pair_metrics(err: torch.Tensor, ref_err: torch.Tensor | None, margin: torch.Tensor) -> dict[str, torch.Tensor]:
    """Detached diagnostics shared by the pairwise objectives."""
    metrics = {
        "implicit_acc": (margin > 0).float(),
        "reward_margin": margin,
        "model_err_w": err[:, 0],
        "model_err_l": err[:, 1],
    }
    if ref_err is not None:
        metrics["ref_err_w"] = ref_err[:, 0]
        metrics["ref_err_l"] = ref_err[:, 1]
    return {k: v.detach().float() for k, v in metrics.items()}
