"""Each objective against an independent hand computation on fixed errors, signs included."""

import math

import pytest
import torch

from diffalign.errors import DiffalignError
from diffalign.objectives import dpo, flow_dpo, mapo, resolve_hparams, sft

ERR = torch.tensor([[0.10, 0.12], [0.30, 0.25]], dtype=torch.float64)
REF = torch.tensor([[0.11, 0.11], [0.28, 0.26]], dtype=torch.float64)


def test_dpo_first_loss_is_ln2_when_policy_equals_reference():
    losses, metrics = dpo.loss(ERR, ERR.clone(), beta=5000.0)
    assert torch.allclose(losses, torch.full((2,), math.log(2.0), dtype=torch.float64))
    assert metrics["reward_margin"].abs().max() == 0


def test_dpo_matches_hand_computation():
    beta = 5000.0
    expected = []
    for (mw, ml), (rw, rl) in zip(ERR.tolist(), REF.tolist()):
        inside = -0.5 * beta * ((mw - ml) - (rw - rl))
        expected.append(math.log1p(math.exp(-inside)))  # -log sigmoid(inside)
    losses, metrics = dpo.loss(ERR, REF, beta=beta)
    assert torch.allclose(losses, torch.tensor(expected, dtype=torch.float64))
    assert metrics["implicit_acc"].tolist() == [1.0, 0.0]


def test_diffusers_sd15_form_equals_original_form():
    """diffusers: -logsigmoid(2500 * (ref_diff - model_diff)); original: -logsigmoid(-0.5*5000*(model_diff - ref_diff))."""
    model_diff = ERR[:, 0] - ERR[:, 1]
    ref_diff = REF[:, 0] - REF[:, 1]
    diffusers_form = -torch.nn.functional.logsigmoid(2500 * (ref_diff - model_diff))
    original_form = -torch.nn.functional.logsigmoid(-0.5 * 5000 * (model_diff - ref_diff))
    ours, _ = dpo.loss(ERR, REF, beta=5000.0)
    assert torch.allclose(ours, diffusers_form) and torch.allclose(ours, original_form)


def test_dpo_making_the_winner_more_likely_lowers_the_loss():
    better = ERR.clone()
    better[:, 0] -= 0.01  # lower denoising error on the winner = higher likelihood
    assert (dpo.loss(better, REF)[0] < dpo.loss(ERR, REF)[0]).all()
    worse_loser = ERR.clone()
    worse_loser[:, 1] += 0.01
    assert (dpo.loss(worse_loser, REF)[0] < dpo.loss(ERR, REF)[0]).all()


def test_dpo_hinge_and_ipo_variants():
    beta = 5000.0
    logits = (REF[:, 0] - REF[:, 1]) - (ERR[:, 0] - ERR[:, 1])
    hinge, _ = dpo.loss(ERR, REF, beta=beta, loss_type="hinge")
    assert torch.allclose(hinge, torch.relu(1 - 0.5 * beta * logits))
    ipo, _ = dpo.loss(ERR, REF, beta=beta, loss_type="ipo")
    # diffusers' ipo: (logits - 1/(2*beta_dpo))^2 with beta_dpo = beta/2
    assert torch.allclose(ipo, (logits - 1 / (2 * (beta / 2))) ** 2)
    with pytest.raises(ValueError, match="loss_type"):
        dpo.loss(ERR, REF, loss_type="cpo")


def test_mapo_matches_hand_computation():
    beta, s, T = 0.1, 0.5, 1000

    def f(x):
        return s * x / (math.exp(s * x) - 1)

    expected = []
    for mw, ml in ERR.tolist():
        margin = T * (f(mw) - f(ml))
        expected.append(mw - beta * -math.log1p(math.exp(-margin)))
    losses, metrics = mapo.loss(ERR, None, beta=beta, snr_value=s, num_timesteps=T)
    assert torch.allclose(losses, torch.tensor(expected, dtype=torch.float64))
    # row 0: winner has the lower error -> positive margin
    assert metrics["implicit_acc"].tolist() == [1.0, 0.0]
    assert "ref_err_w" not in metrics


def test_mapo_gradient_signs():
    err = ERR.clone().requires_grad_(True)
    mapo.loss(err, None)[0].sum().backward()
    assert (err.grad[:, 0] > 0).all()  # lowering the winner's error lowers the loss
    assert (err.grad[:, 1] < 0).all()  # raising the loser's error lowers the loss


def test_mapo_bounded_score_limit_at_zero():
    x = torch.tensor([0.0, 1e-8, 0.5])
    out = mapo.bounded_score(x, 0.5)
    assert torch.isfinite(out).all() and abs(out[0].item() - 1.0) < 1e-6 and out[2] < 1


def test_flow_dpo_is_dpo_with_beta_100():
    ours, _ = flow_dpo.loss(ERR, REF)
    assert torch.allclose(ours, dpo.loss(ERR, REF, beta=100.0)[0])


def test_sft_is_the_chosen_error():
    losses, _ = sft.loss(ERR)
    assert torch.equal(losses, ERR[:, 0])


def test_resolve_hparams_defaults_per_family_and_errors():
    assert resolve_hparams("dpo", "epsilon", {})["beta"] == 5000.0
    assert resolve_hparams("dpo", "flow", {})["beta"] == 100.0
    assert resolve_hparams("mapo", "epsilon", {"beta": 0.2})["beta"] == 0.2
    with pytest.raises(DiffalignError, match="no option"):
        resolve_hparams("mapo", "epsilon", {"betta": 1})
    with pytest.raises(DiffalignError, match="does not serve"):
        resolve_hparams("flow-dpo", "epsilon", {})
    with pytest.raises(DiffalignError, match="unknown method"):
        resolve_hparams("ppo", "epsilon", {})
