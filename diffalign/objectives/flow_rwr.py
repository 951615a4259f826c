"""Flow-RWR: reward-weighted flow matching (Liu et al., VideoAlign, arXiv:2501.13918).

The paper's objective is flow matching on generated samples, each weighted by its reward,
with no KL term and no reference model:

    L = E[ exp(r(x0, c)) * ||v - v_theta(x_t, t, c)||^2 ],   v = noise - x0

diffalign computes it per group of K samples of one prompt (images or videos alike: `err`
is the mean over every non-batch dim of the squared velocity error, diffalign.elbo), all on
the group's one noise draw and one t:

    w_k    = K * exp(r_k / T) / sum_j exp(r_j / T)          normalize="group" (default)
    loss_b = mean_k  w_k * err_k

i.e. the paper's exp(r) weights, self-normalised within the group to mean one. Why: raw
exp(r) depends on the reward's offset and scale (HPS scores near 0.3, PickScore near 21: e^21
overflows any learning rate), while the normalised weights depend only on reward differences
between samples of the same prompt; the loss keeps the scale of plain flow matching (all
weights 1 when the rewards tie), so learning rates carry over from SFT; and the weights do not
depend on the batch size or on how a batch is split over processes. `normalize="batch"`
self-normalises over every sample of the micro-batch instead (w = B K softmax(r / T) over all
B*K): samples of an easy prompt then outweigh those of a hard one, as exp(r) does in the
paper, at the cost of that dependence on the batch. The temperature T (default 1) sets how
sharply the best sample dominates: T -> 0 is SFT on the best sample of each group (flow_grpo's
`type='sft'`), T -> inf is plain flow matching on all of them. The weights are constants (no
gradient through the rewards).

Rewards come from the data's scores: ranked lists' scores ({"images", "scores"}, Syn-Pic
parquet), or a reward per sample (the CSV's reward_A/reward_B columns, JSONL pairs'
"chosen_score"/"rejected_score"); pairs with labels only give the scores (1, 0), so the winner
weighs e^(1/T) against the loser's 1.
"""

from __future__ import annotations

from diffalign.lazy import lazy

torch = lazy("torch")  # loads on first use: `diffalign train` checks its options before torch loads

NEEDS_REF = False
DATA = "ranked"  # K samples with their scores, ties kept (a tie weighs its samples equally)
PREDICTION_TYPES = ("flow",)
NORMALIZATIONS = ("group", "batch")

# Checked before any model loads (diffalign.objectives.check_hparams).
CHOICES = {"normalize": NORMALIZATIONS}
POSITIVE = ("temperature",)


def default_hparams(prediction_type: str) -> dict:
    return {"temperature": 1.0, "normalize": "group"}


def weights(scores: torch.Tensor, temperature: float = 1.0, normalize: str = "group") -> torch.Tensor:
    """(B, K) rewards -> (B, K) weights with mean one per group ("group") or over the batch ("batch")."""
    logits = scores.float() / temperature
    if normalize == "group":
        return scores.shape[1] * torch.softmax(logits, dim=1)
    return logits.numel() * torch.softmax(logits.flatten(), dim=0).view_as(logits)


def loss(
    err: torch.Tensor,
    ref_err: torch.Tensor | None = None,
    *,
    scores: torch.Tensor | None = None,
    num_timesteps: int = 1000,
    temperature: float = 1.0,
    normalize: str = "group",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-group reward-weighted flow-matching loss. err: (B, K) velocity errors, best first;
    scores: (B, K) rewards (None: every sample weighs 1, plain flow matching)."""
    w = torch.ones_like(err) if scores is None else weights(scores.to(err.device), temperature, normalize).detach()
    per_group = (w * err).mean(dim=1)
    metrics = {
        "model_err_w": err[:, 0].detach(),
        "model_err_l": err[:, -1].detach(),
        "weight_best": w[:, 0],
        "weight_max": w.max(dim=1).values,
    }
    return per_group, metrics
