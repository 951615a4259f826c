"""VP-Score (Wu et al. 2024, "Multimodal Large Language Model is a Human-Aligned Annotator for
Text-to-Image Generation", arXiv 2404.15100). EXPERIMENTAL.

Known (paper): VP-Score is a reward model trained on VisionPrefer, 1.2M GPT-4V pairwise
preferences over 179k DiffusionDB prompts x 4 generators, covering prompt-following,
aesthetics, fidelity and harmlessness; its accuracy is reported as comparable to human
annotators.

Assumed (no official code or checkpoint was found in any public source we could read):
- the architecture is ImageReward's (BLIP ViT-L/16 + med BERT cross-encoder + the 5-layer MLP
  head), trained with ImageReward's ranking loss, so its state dict has ImageReward's key names
  and loads through `diffalign.rewards.imagereward`;
- the file is `VP-Score.pt` with `med_config.json` beside it (pass the .pt file itself for any
  other name);
- the output normalisation is unknown: mean 0 and std 1 (the raw head output) by default; pass
  `mean=`/`std=` once the released constants are known.
There is no default hub location: `path` is required.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffalign.errors import DiffalignError
from diffalign.rewards.imagereward import ImageRewardReward, load_imagereward_shaped

WEIGHTS_FILE = "VP-Score.pt"  # assumed name
MEAN, STD = 0.0, 1.0  # assumed: raw head output


class VPScoreReward:
    """Builder for VP-Score: an `ImageRewardReward` named "vpscore" with its own checkpoint and
    normalisation (the same module, so no code is duplicated or inherited)."""

    @staticmethod
    def from_pretrained(path: str | Path | None = None, device=None, dtype: torch.dtype | None = None, **opts: Any) -> ImageRewardReward:
        """`path`: a folder with VP-Score.pt + med_config.json (+ tokenizer/), or the checkpoint
        file. Options as ImageRewardReward.from_pretrained (tokenizer, vit, mean, std, med_config)."""
        if path is None:
            raise DiffalignError(
                f"VP-Score has no known public checkpoint location: place {WEIGHTS_FILE} (ImageReward layout) and "
                "med_config.json in a folder and pass it as path"
            )
        return load_imagereward_shaped(path, device, dtype, "vpscore", WEIGHTS_FILE, {"mean": MEAN, "std": STD, **opts})
