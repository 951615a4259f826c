"""Flow-RWR against hand computations, and its options."""

import math

import pytest
import torch

from diffalign.errors import DiffalignError
from diffalign.objectives import check_hparams, get_objective, resolve_hparams
from diffalign.objectives import flow_rwr


def test_group_normalised_weights_by_hand():
    err = torch.tensor([[0.2, 0.5], [1.0, 3.0]])
    scores = torch.tensor([[1.0, 0.0], [2.0, 2.0]])
    loss, metrics = flow_rwr.loss(err, None, scores=scores, temperature=0.5)
    # group 0: exp(2), exp(0) -> w = 2 e^2 / (e^2 + 1), 2 / (e^2 + 1); group 1: a tie, w = 1, 1
    e2 = math.exp(2.0)
    w0, w1 = 2 * e2 / (e2 + 1), 2 / (e2 + 1)
    expected = torch.tensor([(w0 * 0.2 + w1 * 0.5) / 2, (1.0 + 3.0) / 2])
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(metrics["weight_best"], torch.tensor([w0, 1.0]))
    assert metrics["model_err_w"].tolist() == pytest.approx([0.2, 1.0])


def test_batch_normalised_weights_by_hand():
    err = torch.tensor([[0.2, 0.5], [1.0, 3.0]])
    scores = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    loss, _ = flow_rwr.loss(err, None, scores=scores, temperature=1.0, normalize="batch")
    z = math.e + 1 + 1 + math.exp(-1)
    w = [4 * math.e / z, 4 / z, 4 / z, 4 * math.exp(-1) / z]
    expected = torch.tensor([(w[0] * 0.2 + w[1] * 0.5) / 2, (w[2] * 1.0 + w[3] * 3.0) / 2])
    torch.testing.assert_close(loss, expected)
    assert flow_rwr.weights(scores, 1.0, "batch").mean().item() == pytest.approx(1.0)


def test_weights_are_constants_and_the_gradient_is_weighted_flow_matching():
    err = torch.tensor([[0.3, 0.7, 0.1]], requires_grad=True)
    scores = torch.tensor([[3.0, 1.0, 2.0]], requires_grad=True)
    loss, _ = flow_rwr.loss(err, None, scores=scores)
    loss.sum().backward()
    w = 3 * torch.softmax(scores.detach(), dim=1)
    torch.testing.assert_close(err.grad, w / 3)
    assert scores.grad is None  # no gradient into the rewards


def test_shift_invariant_and_limits():
    err = torch.tensor([[0.2, 0.5, 0.9]])
    scores = torch.tensor([[0.3, 0.1, -0.2]])
    base, _ = flow_rwr.loss(err, None, scores=scores)
    shifted, _ = flow_rwr.loss(err, None, scores=scores + 21.0)  # e.g. PickScore's offset
    torch.testing.assert_close(base, shifted)
    sft, _ = flow_rwr.loss(err, None, scores=scores, temperature=1e-4)  # T -> 0: SFT on the best
    torch.testing.assert_close(sft, torch.tensor([0.2]))
    flat, _ = flow_rwr.loss(err, None, scores=scores, temperature=1e4)  # T -> inf: plain flow matching
    torch.testing.assert_close(flat, err.mean(dim=1), atol=1e-4, rtol=0)
    none, _ = flow_rwr.loss(err, None, scores=None)
    torch.testing.assert_close(none, err.mean(dim=1))


def test_registered_for_flow_models_with_checked_options():
    module = get_objective("flow-rwr")
    assert module is flow_rwr and not module.NEEDS_REF and module.DATA == "ranked"
    assert resolve_hparams("flow-rwr", "flow", {}) == {"temperature": 1.0, "normalize": "group"}
    with pytest.raises(DiffalignError, match="does not serve 'epsilon'"):
        resolve_hparams("flow-rwr", "epsilon", {})
    with pytest.raises(DiffalignError, match="temperature"):
        check_hparams("flow-rwr", {"temperature": 0})
    with pytest.raises(DiffalignError, match="normalize"):
        check_hparams("flow-rwr", {"normalize": "global"})
