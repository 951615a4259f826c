"""SFT baseline: the plain denoising loss on the preferred image only (column 0).

As `--sft` in SalesforceAIResearch/DiffusionDPO; the "SFT-chosen" row of the MaPO and DCPO
tables. No reference model.
"""

from __future__ import annotations

from diffalign.lazy import lazy

torch = lazy("torch")  # loads on first use: `diffalign train` checks its options before torch loads

NEEDS_REF = False
DATA = "pairs"
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")


# Checked before any model loads (diffalign.objectives.check_hparams).
CHOICES = {}
POSITIVE = ()

def default_hparams(prediction_type: str) -> dict:
    return {}


def loss(
    err: torch.Tensor,
    ref_err: torch.Tensor | None = None,
    *,
    scores: torch.Tensor | None = None,
    num_timesteps: int = 1000,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """err: (B, K), best first. Returns err[:, 0] (B,) and the chosen/rejected errors."""
    metrics = {"model_err_w": err[:, 0].detach(), "model_err_l": err[:, 1].detach()}
    return err[:, 0], metrics
