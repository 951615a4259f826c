"""Flow-DPO (Liu et al., VideoAlign, arXiv:2501.13918): Diffusion-DPO on the flow-matching core.

The errors are velocity errors ||(noise - x0) - v_theta(x_t, t)||^2 with x_t = (1-σ)x0 + σ·noise
and σ drawn logit-normal; the loss is Diffusion-DPO's with a constant beta (the paper found a
constant beta better than the derived time-dependent one). flow_grpo's SD3.5 recipe uses the
same 0.5 convention as diffalign with beta = 100.
"""

from __future__ import annotations

from diffalign.lazy import lazy
from diffalign.objectives import dpo

torch = lazy("torch")  # loads on first use: `diffalign train` checks its options before torch loads

NEEDS_REF = True
DATA = "pairs"
PREDICTION_TYPES = ("flow",)


# Checked before any model loads (diffalign.objectives.check_hparams).
CHOICES = {"loss_type": dpo.LOSS_TYPES}
POSITIVE = ("beta",)

def default_hparams(prediction_type: str) -> dict:
    return {"beta": 100.0, "loss_type": "sigmoid"}


def loss(
    err: torch.Tensor,
    ref_err: torch.Tensor,
    *,
    scores: torch.Tensor | None = None,
    num_timesteps: int = 1000,
    beta: float = 100.0,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair Flow-DPO loss on velocity errors. err, ref_err: (B, 2), winner first."""
    return dpo.loss(err, ref_err, beta=beta, loss_type=loss_type)
