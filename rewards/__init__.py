"""Reward models behind one differentiable interface (installed as `diffalign.rewards`).

    reward = load_reward("pickscore", path=None, device="cuda", dtype=torch.float16)
    scores = reward.score(images, prompts)   # float32 Tensor[B], higher is better

`images` is a float tensor in [0, 1], (B, 3, H, W) for images or (B, T, 3, H, W) for videos,
or a list of PIL images / file paths. Tensor input is differentiable end to end.

The registry maps each CLI name to "module:attribute" and is imported lazily, so importing
this package never pulls in open_clip or a large transformers model class.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

# CLI name -> "module:builder". A builder is a class with a `from_pretrained(path, device,
# dtype, **opts)` classmethod (or any callable with that signature) returning a Reward module.
REWARDS: dict[str, Any] = {
    "hpsv2": "diffalign.rewards.hpsv2:HPSv2Reward.v2",
    "hpsv2.1": "diffalign.rewards.hpsv2:HPSv2Reward.v2_1",
    "pickscore": "diffalign.rewards.pickscore:PickScoreReward.from_pretrained",
    "imagereward": "diffalign.rewards.imagereward:ImageRewardReward.from_pretrained",
    "vpscore": "diffalign.rewards.vpscore:VPScoreReward.from_pretrained",
    "clip": "diffalign.rewards.clip:CLIPScoreReward.from_pretrained",
    "videoreward": "diffalign.rewards.videoreward:VideoRewardReward.from_pretrained",
    "toy-reward": "diffalign.rewards.toy:toy_reward",
    "toy-judge": "diffalign.rewards.toy:toy_judge",
}
