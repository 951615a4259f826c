"""RankDPO and DCPO against hand computations and against Diffusion-DPO."""

import math

import pytest
import torch

from diffalign.errors import DiffalignError
from diffalign.objectives import dcpo, dpo, rankdpo, resolve_hparams

ERR2 = torch.tensor([[0.10, 0.12], [0.30, 0.25], [0.2, 0.2]], dtype=torch.float64)
REF2 = torch.tensor([[0.11, 0.11], [0.28, 0.26], [0.21, 0.19]], dtype=torch.float64)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_rankdpo_with_two_images_and_unit_weights_is_diffusion_dpo():
    for beta in (5000.0, 100.0):
        ours, metrics = rankdpo.loss(ERR2, REF2, beta=beta, weighting="none")
        theirs, their_metrics = dpo.loss(ERR2, REF2, beta=beta)
        assert torch.allclose(ours, theirs)
        assert torch.allclose(metrics["reward_margin"].double(), their_metrics["reward_margin"].double())
        assert metrics["implicit_acc"].tolist() == their_metrics["implicit_acc"].tolist()
    # Pick-a-Pic style labels (1, 0) give the same loss.
    labelled, _ = rankdpo.loss(ERR2, REF2, scores=torch.tensor([[1.0, 0.0]] * 3, dtype=torch.float64), weighting="none")
    assert torch.allclose(labelled, dpo.loss(ERR2, REF2)[0])


def test_dcg_weights_equal_a_hand_computation():
    beta = 1.0
    psi = [1.0, 0.5, 0.25, 0.0]
    # policy scores s_i = -0.5*beta*(err_i - ref_i); choose them so the model ranks 2 > 0 > 3 > 1
    s = [0.3, -0.4, 0.9, 0.1]
    ref = torch.zeros(1, 4, dtype=torch.float64)
    err = torch.tensor([[-2 * v / beta for v in s]], dtype=torch.float64)
    position = {2: 1, 0: 2, 3: 3, 1: 4}
    expected = 0.0
    for i in range(4):
        for j in range(4):
            if psi[i] <= psi[j]:
                continue
            gain = abs((2 ** psi[i] - 1) - (2 ** psi[j] - 1))
            discount = abs(1 / math.log2(1 + position[i]) - 1 / math.log2(1 + position[j]))
            expected -= gain * discount * log_sigmoid(s[i] - s[j])
    weights = rankdpo.pair_weights(torch.tensor([psi], dtype=torch.float64), torch.tensor([s], dtype=torch.float64), "dcg")
    assert math.isclose(float(weights[0, 0, 1]), (2 - 2 ** 0.5) * abs(1 / math.log2(3) - 1 / math.log2(5)), rel_tol=1e-12)
    assert float(weights[0, 1, 0]) == 0.0  # only truly ordered pairs count
    losses, _ = rankdpo.loss(err, ref, scores=torch.tensor([psi], dtype=torch.float64), beta=beta)
    assert math.isclose(float(losses[0]), expected, rel_tol=1e-10)


def test_misordered_far_pair_costs_more_than_misordered_near_pair():
    """Model ranks the list exactly backwards; swapping ranks (1, 4) costs more than (2, 3)."""
    psi = torch.tensor([[1.0, 2 / 3, 1 / 3, 0.0]], dtype=torch.float64)
    s = torch.tensor([[-0.3, -0.1, 0.1, 0.3]], dtype=torch.float64)  # inverse of the truth
    weights = rankdpo.pair_weights(psi, s, "dcg")
    assert weights[0, 0, 3] > weights[0, 1, 2] > 0
    # The same violation margin costs more on the far pair: compare the per-pair losses.
    far = weights[0, 0, 3] * -torch.nn.functional.logsigmoid(s[0, 0] - s[0, 3])
    near = weights[0, 1, 2] * -torch.nn.functional.logsigmoid(s[0, 1] - s[0, 2])
    assert far > near
    # And the whole loss grows when the far pair is the mis-ordered one.
    swap_far = torch.tensor([[0.4, 0.0, 0.0, -0.4]], dtype=torch.float64)  # s_0 < s_3
    swap_near = torch.tensor([[0.0, 0.4, -0.4, 0.0]], dtype=torch.float64)  # s_1 < s_2
    zero = torch.zeros(1, 4, dtype=torch.float64)
    far_loss = rankdpo.loss(swap_far, zero, scores=psi, beta=1.0)[0]
    near_loss = rankdpo.loss(swap_near, zero, scores=psi, beta=1.0)[0]
    assert far_loss > near_loss > 0


def test_rankdpo_gradients_flow_and_improve_the_ranking():
    torch.manual_seed(0)
    err = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    ref = torch.rand(3, 4, dtype=torch.float64)
    losses, metrics = rankdpo.loss(err, ref, beta=10.0)
    losses.sum().backward()
    assert err.grad is not None and torch.isfinite(err.grad).all()
    # Best image's error should go down (negative step), worst's up.
    assert (err.grad[:, 0] > 0).all() and (err.grad[:, -1] < 0).all()
    assert set(metrics) >= {"implicit_acc", "reward_margin", "model_err_w", "model_err_l", "ref_err_w", "ref_err_l"}
    assert all(not v.requires_grad for v in metrics.values())


def test_rank_label_gain_takes_raw_reward_scores():
    """label_gain=rank: psi from the order of raw scores; equals psi mode on the win fractions."""
    torch.manual_seed(1)
    err, ref = torch.rand(2, 4, dtype=torch.float64), torch.rand(2, 4, dtype=torch.float64)
    raw = torch.tensor([[31.0, 27.5, 27.5, 19.0], [2.0, 1.0, -3.0, -4.0]], dtype=torch.float64)
    psi = torch.tensor([[1.0, 1 / 3, 1 / 3, 0.0], [1.0, 2 / 3, 1 / 3, 0.0]], dtype=torch.float64)
    ranked, _ = rankdpo.loss(err, ref, scores=raw, beta=3.0, label_gain="rank")
    direct, _ = rankdpo.loss(err, ref, scores=psi, beta=3.0, label_gain="psi")
    assert torch.allclose(ranked, direct)
    with pytest.raises(ValueError, match="label_gain"):
        rankdpo.loss(err, ref, scores=psi, label_gain="ndcg")


def test_rankdpo_without_scores_uses_the_list_order():
    err = torch.tensor([[0.2, 0.1, 0.3]], dtype=torch.float64)
    ref = torch.tensor([[0.25, 0.1, 0.2]], dtype=torch.float64)
    implicit, _ = rankdpo.loss(err, ref, beta=2.0)
    explicit, _ = rankdpo.loss(err, ref, scores=torch.tensor([[1.0, 0.5, 0.0]], dtype=torch.float64), beta=2.0)
    assert torch.allclose(implicit, explicit)


@pytest.mark.parametrize(
    "err, scores, message",
    [
        (torch.zeros(2, 1), None, "K >= 2"),
        (torch.zeros(2, 3), torch.tensor([[1.0, float("nan"), 0.0]] * 2), "NaN"),
        (torch.zeros(2, 3), torch.tensor([[1.0, 0.5]] * 2), "shape"),
        (torch.zeros(2, 3), torch.tensor([[0.0, 0.5, 1.0]] * 2), "best first"),
        (torch.zeros(2, 3), torch.tensor([[30.0, 20.0, 10.0]] * 2), "label_gain=rank"),
    ],
)
def test_rankdpo_bad_input_raises_clear_errors(err, scores, message):
    with pytest.raises(DiffalignError, match=message):
        rankdpo.loss(err, err.clone(), scores=scores)


def test_dcpo_equals_diffusion_dpo_on_the_loss():
    for beta in (500.0, 5000.0):
        ours, metrics = dcpo.loss(ERR2, REF2, beta=beta)
        theirs, their_metrics = dpo.loss(ERR2, REF2, beta=beta)
        assert torch.allclose(ours, theirs)
        assert all(torch.equal(metrics[k], their_metrics[k]) for k in their_metrics)
    assert dcpo.DATA == "captioned-pairs" and dpo.DATA == "pairs"


def test_defaults_per_prediction_type():
    assert resolve_hparams("dcpo", "epsilon", {}) == {"beta": 500.0}
    assert resolve_hparams("dcpo", "flow", {}) == {"beta": 100.0}
    assert resolve_hparams("rankdpo", "v_prediction", {}) == {"beta": 5000.0, "weighting": "dcg", "label_gain": "psi"}
    assert resolve_hparams("rankdpo", "flow", {"weighting": "gain"}) == {"beta": 100.0, "weighting": "gain",
                                                                         "label_gain": "psi"}
    with pytest.raises(DiffalignError, match="weighting"):
        resolve_hparams("rankdpo", "flow", {"loss_type": "hinge"})
