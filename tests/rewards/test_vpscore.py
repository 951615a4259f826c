"""VP-Score (experimental): an ImageReward-shaped checkpoint under its own file name and
normalisation. The score must equal the raw MLP output mapped by the given mean/std, computed
here independently of diffalign (timm ViT + plain-torch BERT from the ImageReward test)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from diffalign.errors import DiffalignError
from diffalign.rewards.imagereward import MEAN as IR_MEAN, STD as IR_STD
from diffalign.rewards.vpscore import VPScoreReward


def _imagereward_test_module():
    # The checkpoint writer and the independent forward live in test_imagereward.py.
    spec = importlib.util.spec_from_file_location("ir_reference", Path(__file__).with_name("test_imagereward.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ir = _imagereward_test_module()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    state = ir.random_checkpoint(ir.VIT, ir.MED, seed=5)
    return ir.write_release(tmp_path_factory.mktemp("vpscore"), state, weights_file="VP-Score.pt"), state


def raw_head_output(state, images, folder, prompts):
    """Undo the ImageReward normalisation of the reference forward: the raw MLP output."""
    return ir.reference_score(state, ir.VIT, ir.MED, images, ir.reference_tokens(folder, prompts)) * IR_STD + IR_MEAN


def test_default_is_raw_head_output(release):
    folder, state = release
    reward = VPScoreReward.from_pretrained(folder, vit=ir.VIT)
    images = torch.rand(2, 3, 36, 32, generator=torch.Generator().manual_seed(7))
    prompts = ["a red cat", "a dog"]
    torch.testing.assert_close(reward.score(images, prompts), raw_head_output(state, images, folder, prompts), atol=2e-5, rtol=1e-5)
    assert reward.name == "vpscore" and not any(p.requires_grad for p in reward.parameters())


def test_mean_std_and_gradient(release):
    folder, state = release
    reward = VPScoreReward.from_pretrained(folder / "VP-Score.pt", vit=ir.VIT, mean=0.5, std=2.0)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(8)).requires_grad_(True)
    score = reward.score(images, "the photo")
    torch.testing.assert_close(score.detach(), (raw_head_output(state, images.detach(), folder, ["the photo"]) - 0.5) / 2.0, atol=2e-5, rtol=1e-5)
    score.sum().backward()
    assert images.grad.abs().sum() > 0


def test_registry_builds_it(release):
    from diffalign.rewards import load_reward

    reward = load_reward("vpscore", path=str(release[0]), vit=ir.VIT, mean=1.0)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(reward.score(images, "a cat"), raw_head_output(release[1], images, release[0], ["a cat"]) - 1.0, atol=2e-5, rtol=1e-5)


def test_needs_a_path_and_the_right_file(tmp_path):
    with pytest.raises(DiffalignError, match="VP-Score.pt"):
        VPScoreReward.from_pretrained(None)
    with pytest.raises(DiffalignError, match="VP-Score.pt"):
        VPScoreReward.from_pretrained(tmp_path, vit=ir.VIT)
    with pytest.raises(DiffalignError, match="unknown vpscore options"):
        VPScoreReward.from_pretrained(tmp_path, vit=ir.VIT, colour="red")
