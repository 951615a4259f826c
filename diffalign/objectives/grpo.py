"""GRPO: group-relative policy optimisation with a reward, online (Flow-GRPO, Liu et al. 2025,
arXiv:2505.05470, yifan123/flow_grpo; DDPO, Black et al. 2023, kvablack/ddpo-pytorch, on DDPM
models; DanceGRPO, XueZeyue/DanceGRPO).

An online objective: the loop (diffalign/online.py `group_rollout`) samples a group of G images
per prompt with the stochastic sampler (the flow SDE step for flow models, DDIM with eta for
DDPM models), keeps each trained step's transition x_t -> x_{t-1} and its log-prob at sampling
(`logp_old`), and scores the final images with the reward. Advantages are relative to the group
(`group_advantages`, flow_grpo/stat_tracking.py):

    A = (r - mean_group(r)) / (std + 1e-4),   std = the group's (or, global_std, the batch's),
    clipped to [-adv_clip_max, adv_clip_max]; a group whose rewards are all equal gets A = 0.

The loss of one image at one trained step is PPO's clipped surrogate (scripts/train_sd3.py):

    ratio = exp(logp - logp_old)
    loss  = max(-A ratio, -A clamp(ratio, 1 - clip_range, 1 + clip_range)) + kl_beta * kl
    kl    = mean over the latent's dims of (mean_theta - mean_ref)^2 / (2 std^2)

`logp` is `log N(x_{t-1}; mean_theta, std^2)` **averaged** over the latent's dims
(diffalign.sampler, as DDPO and Flow-GRPO compute it), so clip_range holds at any resolution;
`kl` is the KL divergence between the policy's and the reference's (adapters off) Gaussian
transitions, which share `std`, averaged the same way. The loop averages the loss over the
images of a batch and the trained steps. Defaults: clip_range 1e-4 (Flow-GRPO and DDPO),
kl_beta 0 (no reference pass; Flow-GRPO's SD3.5 recipes use 0.04).

`loss(logp, logp_old, kl, *, scores=advantages)`: (B,) log-probs under the policy (with
gradients) and stored at sampling, (B,) KL terms or None, (B,) advantages.
"""

from __future__ import annotations

from diffalign.lazy import lazy

torch = lazy("torch")  # loads on first use: `diffalign train` checks its options before torch loads

NEEDS_REF = False  # the reference runs only when kl_beta > 0 (the loop asks `needs_reference`)
DATA = "prompts"
ROLLOUT = "groups"  # diffalign/online.py: G images a prompt, not SPO's branching pairs
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")

CHOICES: dict = {}
POSITIVE = ("clip_range",)

# flow_grpo/stat_tracking.py: the std's floor
ADV_EPS = 1e-4


def default_hparams(prediction_type: str) -> dict:
    return {"clip_range": 1e-4, "kl_beta": 0.0}


def needs_reference(hparams: dict) -> bool:
    return float(hparams.get("kl_beta", 0.0)) > 0


def group_advantages(rewards: torch.Tensor, *, global_std: bool = False, clip_max: float = 5.0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards (N, G): N groups (prompts) of G images -> (advantages (N, G), zero_std (N,) bool).

    (r - group mean) / (std + 1e-4), the std of the group (population std, as numpy's) or of all
    N * G rewards (`global_std`), clipped to +-clip_max. A group whose rewards are all equal has
    nothing to compare: its advantages are 0 (not rounding noise divided by 1e-4)."""
    r = rewards.double()
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(unbiased=False) if global_std else r.std(dim=1, unbiased=False, keepdim=True)
    adv = (r - mean) / (std + ADV_EPS)
    zero_std = r.amax(dim=1) == r.amin(dim=1)
    adv = torch.where(zero_std[:, None], torch.zeros_like(adv), adv)
    return adv.clamp(-clip_max, clip_max).float(), zero_std


def kl_divergence(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(ref_mean, std^2)) averaged over non-batch dims: (B,) float32."""
    diff = (mean.float() - ref_mean.float()) ** 2 / (2 * std.float() ** 2)
    return diff.mean(dim=tuple(range(1, diff.ndim)))


def loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    kl: torch.Tensor | None = None,
    *,
    scores: torch.Tensor | None = None,
    num_timesteps: int = 1000,
    clip_range: float = 1e-4,
    kl_beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-image PPO-clipped loss at one step. logp, logp_old: (B,) per-step log-probs under
    the policy and at sampling; kl: (B,) or None; scores: (B,) advantages. Returns (B,), metrics."""
    if scores is None:
        raise ValueError("GRPO needs the advantages (scores=)")
    adv = scores.float().to(logp.device)
    log_ratio = logp.float() - logp_old.float().to(logp.device)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    losses = torch.maximum(unclipped, clipped)
    metrics = {
        "policy_loss": losses,
        "ratio": ratio,
        # the share of images whose ratio left the trust region: their gradient is 0 when the
        # clamped term is the larger one
        "clipfrac": ((ratio - 1).abs() > clip_range).float(),
        "approx_kl": 0.5 * log_ratio**2,  # Flow-GRPO's logged approximation of KL(old || new)
        "advantage": adv.abs(),
        "logp": logp,
    }
    if kl is not None:
        losses = losses + kl_beta * kl.float()
        metrics["kl"] = kl
    return losses, {k: v.detach().float() for k, v in metrics.items()}
