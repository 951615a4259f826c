"""The toy-world rewards: small transformers CLIPModel + CLIPProcessor folders shipped in
assets/toy-reward (the reward optimised in toy runs) and assets/toy-judge (a separate judge for
evaluation, so a run cannot simply overfit its own judge). Both score like PickScore:
`logit_scale.exp() * cosine`, through the PickScore code.
"""

from __future__ import annotations

from typing import Any

import torch

from diffalign.errors import DiffalignError
from diffalign.rewards.pickscore import PickScoreReward


def _toy(name: str, path: str | None, device, dtype, opts: dict[str, Any]) -> PickScoreReward:
    if path is None:
        # The one exception to "rewards import only diffalign.errors": the shipped asset path.
        from diffalign.paths import asset

        folder = asset(name)
        if not (folder / "config.json").is_file():
            raise DiffalignError(
                f"toy asset {str(folder)!r} is missing: build it from a clone with "
                f"`python -m tools.toy build --only {name}` or pass path=<folder>"
            )
        path = str(folder)
    return PickScoreReward.from_pretrained(path, device, dtype, name=name, **opts)


def toy_reward(path: str | None = None, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None, **opts: Any) -> PickScoreReward:
    return _toy("toy-reward", path, device, dtype, opts)


def toy_judge(path: str | None = None, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None, **opts: Any) -> PickScoreReward:
    return _toy("toy-judge", path, device, dtype, opts)
