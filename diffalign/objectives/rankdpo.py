"""RankDPO: ranked preference optimisation (Karthik et al., 2024, arXiv:2410.18013), Eqs. 5-7.

A group is one prompt with K >= 2 images, best first, with label scores psi (B, K) in [0, 1]
(Syn-Pic's psi_i = wins_i / (n_rewards * (K - 1)), what `diffalign label` writes). All K
images share the noise and the timestep. In diffalign's beta convention (see dpo.py):

    s_i      = -0.5 * beta * (err_i - ref_err_i)                  per-image DPO score (Eq. 5)
    pi(i)    = position of image i when the model ranks s descending (1 = top; detached)
    G_i      = 2^psi_i - 1                                         gain
    D(r)     = log2(1 + r)                                         discount
    Delta_ij = |G_i - G_j| * |1/D(pi(i)) - 1/D(pi(j))|             DCG weight (Eq. 6)
    loss     = -sum_{psi_i > psi_j} Delta_ij * log sigmoid(s_i - s_j)   (Eq. 7)

Delta_ij is LambdaRank's |change in DCG| when i and j swap places in the model's current
ranking, so a mis-ordered pair far apart in the ranking (1 vs 4) costs more than a near one
(2 vs 3). For K = 2 and unit weights, s_0 - s_1 is exactly Diffusion-DPO's `inside`.

What was verified, and what is our choice (docs/papers.md, "RankDPO"): the paper's Algorithm 2
(read in a text extraction of the arXiv PDF) has shared t and eps, s_i = err - ref_err, a gain
difference 2^psi_i - 2^psi_j (the -1 cancels), D(r) = log(1 + r), a product |G_ij| times a
discount difference, and a sum over ordered pairs; Algorithm 1 defines psi as the win fraction.
The extraction lost the fraction bars, so the 1/D reading (standard DCG, LambdaRank) is ours,
as is log base 2 (a constant factor: D(1) = 1). Fig. 2's caption says the ranking pi comes
from the model's scores s_i; Algorithm 2's text can also be read as sorting by psi. We follow
the caption (LambdaRank). Ties in s (at step 0 the policy equals the reference) keep the data
order, so the first step still weights far pairs more. The paper does not give beta for RankDPO:
the defaults are Diffusion-DPO's (5000 for epsilon/v, 100 for flow), our assumption.

`weighting`: "dcg" (the paper), "gain" (|G_i - G_j| only: the paper's "DPO + gain weights"
ablation), "none" (unit weights: plain DPO summed over all ordered pairs).

`label_gain`: "psi" (default) takes the data's scores as psi, which must lie in [0, 1] (what
`diffalign label` writes: the multi-reward win fractions of Algorithm 1). "rank" computes psi
inside each group as the share of the group's other images whose score is lower: Algorithm 1
with the data's score as the single reward, so raw reward values of any scale work (e.g. the
toy ranked.parquet, whose labels are toy-reward scores). The two agree on single-reward data.
"""

from __future__ import annotations

from diffalign.errors import DiffalignError
from diffalign.lazy import lazy
from diffalign.objectives.dpo import pair_metrics

torch = lazy("torch")  # loads on first use: `diffalign train` checks its options before torch loads
F = lazy("torch.nn.functional")

NEEDS_REF = True
DATA = "ranked"
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")

DEFAULT_BETA = {"epsilon": 5000.0, "v_prediction": 5000.0, "flow": 100.0}
WEIGHTINGS = ("dcg", "gain", "none")
LABEL_GAINS = ("psi", "rank")


# Checked before any model loads (diffalign.objectives.check_hparams).
CHOICES = {"weighting": WEIGHTINGS, "label_gain": LABEL_GAINS}
POSITIVE = ("beta",)

def default_hparams(prediction_type: str) -> dict:
    return {"beta": DEFAULT_BETA[prediction_type], "weighting": "dcg", "label_gain": "psi"}


def check_label_scores(scores: torch.Tensor, shape: torch.Size, label_gain: str) -> None:
    """Label scores must match err, be finite and sorted best first; psi must lie in [0, 1]."""
    if tuple(scores.shape) != tuple(shape):
        raise DiffalignError(f"scores have shape {tuple(scores.shape)} but errors have {tuple(shape)}: pass one score per image")
    if not torch.isfinite(scores).all():
        raise DiffalignError("ranked-list scores contain NaN or inf: fix or drop those rows of the dataset")
    if (scores[:, 1:] > scores[:, :-1]).any():
        raise DiffalignError("ranked-list scores are not sorted best first: sort each group by score, descending")
    if label_gain == "psi" and (scores.min() < 0 or scores.max() > 1):
        raise DiffalignError(
            "RankDPO label scores must lie in [0, 1] (the paper's win fractions, as `diffalign label` "
            "writes them): for raw reward scores set --objective label_gain=rank"
        )


def win_fractions(scores: torch.Tensor) -> torch.Tensor:
    """psi_i = share of the group's other images with a lower score (ties win nothing): (B, K)."""
    wins = (scores[:, :, None] > scores[:, None, :]).sum(dim=2)
    return wins.to(scores.dtype) / (scores.shape[1] - 1)


def positional_scores(batch: int, k: int, like: torch.Tensor) -> torch.Tensor:
    """psi for a list known only by its order: (K-1-i)/(K-1), Algorithm 1 with one reward and no ties."""
    column = torch.arange(k - 1, -1, -1, dtype=like.dtype, device=like.device) / (k - 1)
    return column.expand(batch, k)


def predicted_positions(s: torch.Tensor) -> torch.Tensor:
    """1-based position of each image when the model ranks its scores descending: (B, K).

    A stable sort, so equal scores keep the data order (best first).
    """
    order = torch.sort(s.detach(), dim=1, descending=True, stable=True).indices
    positions = torch.empty_like(order)
    ranks = torch.arange(1, s.shape[1] + 1, device=s.device).expand_as(order)
    positions.scatter_(1, order, ranks)
    return positions


def pair_weights(psi: torch.Tensor, s: torch.Tensor, weighting: str) -> torch.Tensor:
    """Weight of each ordered pair (i above j): (B, K, K), zero where psi_i <= psi_j."""
    above = (psi[:, :, None] > psi[:, None, :]).to(s.dtype)  # pair (i, j) counts when i is truly better
    if weighting == "none":
        return above
    gain = torch.pow(2.0, psi.to(s.dtype)) - 1.0
    gain_diff = (gain[:, :, None] - gain[:, None, :]).abs()
    if weighting == "gain":
        return above * gain_diff
    if weighting != "dcg":
        raise ValueError(f"unknown weighting {weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
    inv_discount = 1.0 / torch.log2(1.0 + predicted_positions(s).to(s.dtype))  # 1/D(pi(i))
    discount_diff = (inv_discount[:, :, None] - inv_discount[:, None, :]).abs()
    return above * gain_diff * discount_diff


def loss(
    err: torch.Tensor,
    ref_err: torch.Tensor,
    *,
    scores: torch.Tensor | None = None,
    num_timesteps: int = 1000,
    beta: float = 5000.0,
    weighting: str = "dcg",
    label_gain: str = "psi",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-group RankDPO loss. err, ref_err: (B, K) best first; scores: (B, K) or None (list order)."""
    if ref_err is None:
        raise ValueError("RankDPO needs the reference model's errors (ref_err)")
    if err.ndim != 2 or err.shape[1] < 2:
        raise DiffalignError(f"RankDPO needs groups of K >= 2 images, got errors of shape {tuple(err.shape)}: "
                             "give every prompt at least two ranked images")
    if label_gain not in LABEL_GAINS:
        raise ValueError(f"unknown label_gain {label_gain!r}: choose one of {', '.join(LABEL_GAINS)}")
    batch, k = err.shape
    if scores is None:
        psi = positional_scores(batch, k, err)
    else:
        check_label_scores(scores, err.shape, label_gain)
        psi = scores.to(err.dtype) if label_gain == "psi" else win_fractions(scores.to(err.dtype))
    s = -0.5 * beta * (err - ref_err)  # (B, K) per-image DPO scores, Eq. 5
    margins = s[:, :, None] - s[:, None, :]  # (B, K, K): s_i - s_j
    weights = pair_weights(psi, s, weighting)  # (B, K, K), no gradient
    losses = -(weights * F.logsigmoid(margins)).sum(dim=(1, 2))
    metrics = pair_metrics(err[:, [0, -1]], ref_err[:, [0, -1]], margins[:, 0, -1])
    # Share of truly ordered pairs the model already orders right (implicit ranking accuracy).
    pairs = (psi[:, :, None] > psi[:, None, :]).to(s.dtype)
    correct = ((margins > 0).to(s.dtype) * pairs).sum(dim=(1, 2))
    metrics["implicit_acc"] = (correct / pairs.sum(dim=(1, 2)).clamp(min=1)).detach().float()
    return losses, metrics
