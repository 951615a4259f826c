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
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from diffalign.errors import DiffalignError
from diffalign.rewards.base import (
    ImageInput,
    PromptInput,
    Reward,
    check_batch,
    check_scores,
    load_image,
)

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
    "spm": "diffalign.rewards.spm:SPMReward.from_pretrained",
    "toy-reward": "diffalign.rewards.toy:toy_reward",
    "toy-judge": "diffalign.rewards.toy:toy_judge",
    "toy-video-reward": "diffalign.rewards.toy_video:toy_video_reward",
    "toy-video-judge": "diffalign.rewards.toy_video:toy_video_judge",
    "toy-spm": "diffalign.rewards.spm:toy_spm",
}

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}

__all__ = ["REWARDS", "Reward", "FunctionReward", "CombinedReward", "load_reward", "register_reward",
           "as_reward", "combine", "as_dtype"]


class FunctionReward(nn.Module):
    """A plain callable `(images (B, 3, H, W) in [0, 1], prompts list[str]) -> Tensor[B]` as a
    Reward: inputs are checked and coerced (PIL/paths -> one tensor) before the call."""

    def __init__(self, fn: Callable[[Tensor, list[str]], Tensor], name: str):
        super().__init__()
        self.fn = fn
        self.name = name

    def score(self, images: ImageInput, prompts: PromptInput, *, exact: bool = False) -> Tensor:
        """`exact`: tensors are rounded to 8-bit pixels first, as a saved image would be (a plain
        callable has no preprocessing of its own to follow)."""
        prompts = check_batch(images, prompts, video=isinstance(images, Tensor) and images.ndim == 5)
        if exact and isinstance(images, Tensor):
            images = (images.detach().clamp(0, 1) * 255).round() / 255
        if not isinstance(images, Tensor):
            items = [load_image(item) for item in images]
            if len({tuple(x.shape) for x in items}) != 1:
                raise DiffalignError(f"reward {self.name!r} takes one tensor: resize the images to one size first")
            images = torch.stack(items)
        return check_scores(self.fn(images, prompts), len(prompts), self.name)

    def forward(self, images: ImageInput, prompts: PromptInput) -> Tensor:
        return self.score(images, prompts)


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise DiffalignError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def register_reward(name: str, reward: Any, *, overwrite: bool = False) -> None:
    """Add a user reward under `name`. `reward` is one of:
    - a class with `from_pretrained(path, device, dtype, **opts)` (built on `load_reward`),
    - a "module:attribute" string naming such a builder (imported lazily),
    - a Reward instance (anything with a `score` method), returned as is,
    - a plain callable `(images, prompts) -> Tensor[B]`, wrapped in FunctionReward.
    """
    if name in REWARDS and not overwrite:
        raise DiffalignError(f"reward {name!r} is already registered: pick another name or pass overwrite=True")
    if not (isinstance(reward, str) or callable(reward) or isinstance(reward, Reward)):
        raise DiffalignError(f"cannot register {type(reward).__name__} as reward {name!r}: pass a class, a callable or a Reward")
    REWARDS[name] = reward


def _import_builder(spec: str) -> Callable[..., Any]:
    module_name, _, attribute = spec.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


def load_reward(name: str, path: str | None = None, device: torch.device | str | None = None,
                dtype: torch.dtype | str | None = None, **opts: Any) -> nn.Module:
    """Build the registered reward `name`: a frozen module in eval mode with `score()`.
    `path` overrides where the weights come from (a file or a folder); `opts` go to the builder."""
    if name not in REWARDS:
        raise DiffalignError(f"unknown reward {name!r}: choose one of {', '.join(sorted(REWARDS))} or register_reward() it")
    entry = REWARDS[name]
    if isinstance(entry, str):
        builder = _import_builder(entry)  # built-in entries name the builder itself
    elif isinstance(entry, type):
        builder = entry.from_pretrained
    elif isinstance(entry, Reward):
        return _ready_made(name, entry, path, opts)
    else:
        return _ready_made(name, FunctionReward(entry, name), path, opts)
    if isinstance(builder, type):
        builder = builder.from_pretrained
    reward = builder(path, device=device, dtype=as_dtype(dtype), **opts)
    if not isinstance(reward, Reward):
        raise DiffalignError(f"builder of reward {name!r} returned {type(reward).__name__}, not a Reward: give it a score() method")
    if isinstance(reward, nn.Module):  # the contract: frozen and in eval mode, whatever the builder did
        reward.eval().requires_grad_(False)
    return reward


def _ready_made(name: str, reward: Any, path: Any, opts: dict) -> Any:
    # A registered instance or function has no weights to point at: reject options, don't ignore them.
    if path is not None or opts:
        raise DiffalignError(f"reward {name!r} is a ready-made callable: it takes no path or options")
    return reward


def as_reward(reward: Any, **load_kwargs: Any) -> Any:
    """A registry name, a Reward, or a plain `(images, prompts) -> Tensor[B]` callable -> Reward."""
    if isinstance(reward, str):
        return load_reward(reward, **load_kwargs)
    if isinstance(reward, Reward):
        return reward
    if callable(reward):
        return FunctionReward(reward, getattr(reward, "__name__", type(reward).__name__))
    raise DiffalignError(f"{type(reward).__name__} is not a reward: pass a name, a Reward or a callable")


class CombinedReward(nn.Module):
    """Weighted sum of rewards. `forward` returns (total (B,), {name: raw score (B,)});
    `score` returns the total only, so a CombinedReward is itself a Reward.

    normalize: False (raw scores), "zscore" (each reward standardised over the batch, needs
    B >= 2), or {name: (mean, std)} with fixed constants per reward (others stay raw).
    """

    def __init__(self, rewards: Mapping[str, Any], weights: Mapping[str, float], normalize: Any = False):
        super().__init__()
        if not (normalize is False or normalize is None or normalize == "zscore" or isinstance(normalize, Mapping)):
            raise DiffalignError(f"unknown normalize={normalize!r}: use False, 'zscore' or {{name: (mean, std)}}")
        # nn.ModuleDict keys may not contain '.', as in "hpsv2.1": keep a plain dict of modules.
        self.rewards = dict(rewards)
        for i, module in enumerate(r for r in self.rewards.values() if isinstance(r, nn.Module)):
            self.add_module(f"reward_{i}", module)
        self.weights = {k: float(v) for k, v in weights.items()}
        self.normalize = normalize or False
        self.name = "+".join(self.rewards)

    def _normalized(self, name: str, scores: Tensor) -> Tensor:
        if self.normalize == "zscore":
            if scores.shape[0] < 2:
                raise DiffalignError("normalize='zscore' needs at least 2 images per call: use fixed (mean, std) or False")
            return (scores - scores.mean()) / (scores.std(unbiased=False) + 1e-6)
        if isinstance(self.normalize, Mapping) and name in self.normalize:
            mean, std = self.normalize[name]
            return (scores - mean) / std
        return scores

    def forward(self, images: ImageInput, prompts: PromptInput, *, exact: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        parts = {name: reward.score(images, prompts, exact=exact) for name, reward in self.rewards.items()}
        total = sum(self.weights[name] * self._normalized(name, s) for name, s in parts.items())
        return total, parts

    def score(self, images: ImageInput, prompts: PromptInput, *, exact: bool = False) -> Tensor:
        return self.forward(images, prompts, exact=exact)[0]


def combine(weights: Mapping[Any, float], normalize: Any = False, *, paths: Mapping[str, str] | None = None,
            options: Mapping[str, dict] | None = None, device: torch.device | str | None = None,
            dtype: torch.dtype | str | None = None) -> CombinedReward:
    """`combine({"hpsv2.1": 5.0, "pickscore": 0.05, my_fn: 1.0})`: keys are registry names,
    Rewards or callables; names load with `paths[name]`, `options[name]`, `device` and `dtype`."""
    if not weights:
        raise DiffalignError("combine() got no rewards: pass {name_or_reward: weight, ...}")
    paths, options = dict(paths or {}), dict(options or {})
    rewards, named_weights = {}, {}
    for key, weight in weights.items():
        kwargs = {}
        if isinstance(key, str):
            kwargs = {"path": paths.get(key), "device": device, "dtype": dtype, **options.get(key, {})}
        reward = as_reward(key, **kwargs)
        name = key if isinstance(key, str) else reward.name
        if name in rewards:
            raise DiffalignError(f"reward {name!r} appears twice in combine(): give each one a distinct name")
        rewards[name], named_weights[name] = reward, weight
    return CombinedReward(rewards, named_weights, normalize)
