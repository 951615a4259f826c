"""The Reward contract, checked on every registry entry this suite can build tiny weights for:
frozen eval module, float32 (B,), finite, deterministic, gradient on the images."""

from __future__ import annotations

import pytest
import torch

from diffalign.rewards import load_reward
from diffalign.rewards.base import Reward, tensor_to_pil

from helpers import TINY_OPEN_CLIP

# name -> how to load it on the tiny fixtures (ImageReward, VP-Score, VideoReward: their own tests).
CASES = {
    "hpsv2": lambda hps, hf: load_reward("hpsv2", path=str(hps), architecture=TINY_OPEN_CLIP),
    "hpsv2.1": lambda hps, hf: load_reward("hpsv2.1", path=str(hps), architecture=TINY_OPEN_CLIP),
    "pickscore": lambda hps, hf: load_reward("pickscore", path=str(hf)),
    "clip": lambda hps, hf: load_reward("clip", path=str(hf)),
    "toy-reward": lambda hps, hf: load_reward("toy-reward", path=str(hf)),
    "toy-judge": lambda hps, hf: load_reward("toy-judge", path=str(hf)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_reward_contract(name, hps_checkpoint, hf_clip_folder):
    reward = CASES[name](hps_checkpoint, hf_clip_folder)
    assert isinstance(reward, Reward) and isinstance(reward, torch.nn.Module)
    assert not reward.training and not any(p.requires_grad for p in reward.parameters())
    images = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(3), requires_grad=True)
    prompts = ["a photo of a cat", "a photo of a dog"]
    scores = reward.score(images, prompts)
    assert scores.dtype == torch.float32 and scores.shape == (2,) and torch.isfinite(scores).all()
    # CLIP score clamps at 0; its gradient is checked where the score is positive (test_clip.py).
    if name != "clip":
        scores.sum().backward()
        assert images.grad.abs().sum() > 0
    torch.testing.assert_close(reward.score(images.detach(), prompts), scores.detach())
    # exact=True: the tensors as uint8 PIL images through the original's own preprocessing
    exact = reward.score(images.detach(), prompts, exact=True)
    assert exact.dtype == torch.float32 and exact.shape == (2,) and not exact.requires_grad
    torch.testing.assert_close(exact, reward.score([tensor_to_pil(x) for x in images.detach()], prompts), atol=1e-6, rtol=0)
