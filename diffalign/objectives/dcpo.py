"""DCPO: dual caption preference optimisation (Saeidi et al., 2025, arXiv:2502.06023).

The loss is Diffusion-DPO's (dpo.py, same beta convention):

    inside = -0.5 * beta * ((err_w - ref_err_w) - (err_l - ref_err_l)),  loss = -log sigmoid(inside)

What changes is the conditioning: `DATA = "captioned-pairs"` makes the training loop condition
the winner on its own caption z^w and the loser on z^l (data columns caption_0/caption_1, or
per-image captions in JSONL), for the policy and the reference alike. So err_w is
||eps - eps_theta(x^w_t, z^w)||^2 and err_l is ||eps - eps_theta(x^l_t, z^l)||^2; with both
captions equal to the prompt this is exactly Diffusion-DPO. The caption strategies of the paper
(captioner, perturbed loser prompt, hybrid) are data tools in diffalign/captions.py.

Defaults: beta = 500 for epsilon/v models, as in the authors' src/run.sh (sahsaeedi/DCPO-T2I,
SD 2.1; its argparse default is 5000). The paper has no flow model; beta = 100 for flow is our
assumption, carried over from Flow-DPO's setting.
"""

from __future__ import annotations

from diffalign.lazy import lazy
from diffalign.objectives.dpo import pair_logits, pair_metrics

torch = lazy("torch")  # loads on first use: `diffalign train` checks its options before torch loads
F = lazy("torch.nn.functional")

NEEDS_REF = True
DATA = "captioned-pairs"
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")

DEFAULT_BETA = {"epsilon": 500.0, "v_prediction": 500.0, "flow": 100.0}


# Checked before any model loads (diffalign.objectives.check_hparams).
CHOICES = {}
POSITIVE = ("beta",)

def default_hparams(prediction_type: str) -> dict:
    return {"beta": DEFAULT_BETA[prediction_type]}


def loss(
    err: torch.Tensor,
    ref_err: torch.Tensor,
    *,
    scores: torch.Tensor | None = None,
    num_timesteps: int = 1000,
    beta: float = 500.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair DCPO loss. err, ref_err: (B, 2), winner first, each under its own caption."""
    if ref_err is None:
        raise ValueError("DCPO needs the reference model's errors (ref_err)")
    if err.ndim != 2 or err.shape[1] != 2:
        raise ValueError(f"DCPO takes pairs: errors of shape (B, 2), got {tuple(err.shape)}")
    inside = 0.5 * beta * pair_logits(err, ref_err)  # (B,)
    return -F.logsigmoid(inside), pair_metrics(err, ref_err, inside)
