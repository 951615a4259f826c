"""SPO: step-aware preference optimisation (Liang et al., CVPR 2025, arXiv:2406.04314).

An online objective: the loop (diffalign/online.py) samples its own trajectories, branches k
candidates x_{t-1} from one x_t, and keeps (x_t, x_{t-1}^w, x_{t-1}^l) when the reward separates
the best and the worst candidate. The loss is over the per-step Gaussian log-probs of the two
transitions, under the policy and under the reference (RockeyCoss/SPO train_spo.py):

    r_w  = clamp(exp(logp^w - ref_logp^w), 1 - eps, 1 + eps)      and the same for r_l
    loss = -log sigmoid(beta * (log r_w - log r_l))

`logp` is `log N(x_{t-1}; mean, std^2)` **averaged** over the latent's dims (diffalign.sampler,
as DDPO and SPO), not summed, so beta and eps hold at any resolution. The hard clamp is a
trust region (as D3PO's 0.9-1.1): a pair whose ratio has left [1 - eps, 1 + eps] gives no
gradient through that ratio. Defaults: beta 10, eps 0.1 (configs/basic_config.py there).

`loss` takes the log-probs where the offline objectives take errors: `err` and `ref_err` are
(B, 2) log-probs, winner first (higher is better, the opposite sign of an error).
"""

from __future__ import annotations

from diffalign.lazy import lazy

torch = lazy("torch")  # loads on first use: `diffalign train` checks its options before torch loads
F = lazy("torch.nn.functional")

NEEDS_REF = True
DATA = "prompts"
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")

CHOICES: dict = {}
POSITIVE = ("beta", "eps")


def default_hparams(prediction_type: str) -> dict:
    return {"beta": 10.0, "eps": 0.1}


def loss(
    err: torch.Tensor,
    ref_err: torch.Tensor,
    *,
    scores: torch.Tensor | None = None,
    num_timesteps: int = 1000,
    beta: float = 10.0,
    eps: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair SPO loss. err, ref_err: (B, 2) per-step log-probs of the winner's and the
    loser's transition under the policy and the reference. Returns (B,) and metrics."""
    if ref_err is None:
        raise ValueError("SPO needs the reference model's log-probs (ref_err)")
    ratio = torch.exp(err.float() - ref_err.float()).clamp(1 - eps, 1 + eps)  # (B, 2)
    margin = beta * (torch.log(ratio[:, 0]) - torch.log(ratio[:, 1]))
    losses = -F.logsigmoid(margin)
    metrics = {
        "implicit_acc": (margin > 0).float(),
        "reward_margin": margin,
        "ratio_w": ratio[:, 0],
        "ratio_l": ratio[:, 1],
        # the share of ratios the clamp holds: those give no gradient
        "clipped": ((ratio <= 1 - eps) | (ratio >= 1 + eps)).float().mean(dim=1),
        "logp_w": err[:, 0],
        "logp_l": err[:, 1],
    }
    return losses, {k: v.detach().float() for k, v in metrics.items()}
