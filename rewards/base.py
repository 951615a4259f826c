"""Shared pieces of every reward: the `score()` contract, input checks, preprocessing, and
weight loading.

Two preprocessing paths, both honest:
- PIL images and image files go through each original's own preprocessing (the HF image
  processor's PIL resize for PickScore/CLIP, torchvision's PIL transforms for ImageReward,
  open_clip's transform for the open_clip CLIP score, hpsv2's ToTensor-then-resize), so a score
  equals the original's on the same weights and file. Each reward passes its `pil_transform`.
- Tensor images are resized, cropped, padded and normalised in torch (`F.interpolate` bicubic
  with antialias), so they stay differentiable from the reward back to the latents. The
  difference to the PIL path is measured per reward in docs/rewards.md. `exact=True` sends
  tensors through the PIL path instead (rounded to uint8 first; no gradient).

This module imports only torch, PIL and `diffalign.errors` at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, Union, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.errors import DiffalignError

# OpenAI CLIP normalisation, used by HPSv2, PickScore, CLIP score and ImageReward.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Pixel values a little outside [0, 1] come from bicubic resizing or fp16 decoding; real
# range mistakes ([-1, 1] or [0, 255]) are far larger.
RANGE_TOLERANCE = 1e-3

# Files that are videos, not images, by suffix (videoreward reads them; image rewards refuse them).
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif")

ImageInput = Union[Tensor, Sequence[Any]]  # tensor, or a list of PIL images / paths / tensors
PromptInput = Union[str, Sequence[str]]


@runtime_checkable
class Reward(Protocol):
    """What every reward is: a frozen `nn.Module` with a name and a `score` method.

    `score(images, prompts)` returns a float32 tensor of shape (B,), higher is better,
    differentiable with respect to tensor images, with no reduction over the batch. Rewards
    never apply weights, sign flips or offsets: that is the caller's job (see `combine`).
    `exact=True` sends tensors through the original's own preprocessing (as 8-bit images, no
    gradient), so a score equals the original code's on the saved image.
    """

    name: str

    def score(self, images: ImageInput, prompts: PromptInput, *, exact: bool = False) -> Tensor: ...


# ----------------------------------------------------------------------------------------
# Input checks and coercion
# ----------------------------------------------------------------------------------------


def check_image_tensor(images: Tensor, video: bool = False) -> Tensor:
    """Raise a DiffalignError unless `images` is a float (B, 3, H, W) tensor in [0, 1]
    ((B, T, 3, H, W) when `video`). Returns the tensor unchanged."""
    want = "(B, T, 3, H, W)" if video else "(B, 3, H, W)"
    if not torch.is_floating_point(images):
        raise DiffalignError(
            f"images have dtype {images.dtype}: rewards take float pixels in [0, 1]; "
            "convert uint8 with `images.float() / 255`"
        )
    ndim = 5 if video else 4
    if images.ndim != ndim or images.shape[-3] != 3:
        hint = " (a single image? add a batch dimension with images[None])" if images.ndim == ndim - 1 else ""
        raise DiffalignError(f"images have shape {tuple(images.shape)}: expected {want} RGB{hint}")
    if images.shape[0] == 0:
        raise DiffalignError("empty batch of images: pass at least one image")
    low, high = float(images.detach().min()), float(images.detach().max())
    if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        fix = "map [-1, 1] to [0, 1] with (x + 1) / 2" if low < 0 else "divide [0, 255] pixels by 255"
        raise DiffalignError(f"image values span [{low:.3g}, {high:.3g}]: rewards take [0, 1]; {fix}")
    return images


def check_prompts(prompts: PromptInput, batch_size: int) -> list[str]:
    """One prompt per image; a single string is used for the whole batch."""
    if isinstance(prompts, str):
        return [prompts] * batch_size
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise DiffalignError("prompts must be strings: pass a str or a list of str, one per image")
    if len(prompts) != batch_size:
        raise DiffalignError(
            f"{len(prompts)} prompts for {batch_size} images: pass one prompt per image (or a single str for all)"
        )
    return prompts


def check_batch(images: ImageInput, prompts: PromptInput, video: bool = False) -> list[str]:
    """Check the images first (shape, range, emptiness), then return one prompt per image."""
    if isinstance(images, Tensor):
        check_image_tensor(images, video=video)
    elif isinstance(images, (str, os.PathLike)) or not isinstance(images, Sequence):
        raise DiffalignError(f"images of type {type(images).__name__}: pass a tensor or a list of PIL images / paths")
    elif len(images) == 0:
        raise DiffalignError("empty list of images: pass at least one image")
    return check_prompts(prompts, num_images(images))


def load_image(item: Any) -> Tensor:
    """A PIL image, a path, or a (3, H, W) tensor -> float (3, H, W) tensor in [0, 1]."""
    if isinstance(item, Tensor):
        return check_image_tensor(item[None])[0]
    return pil_to_tensor(load_pil(item))


def load_pil(item: Any) -> Any:
    """A PIL image or an image file path -> a PIL image with its pixels read and its mode kept
    (the originals open files with `Image.open` and convert to RGB inside their transforms)."""
    from PIL import Image

    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise DiffalignError(f"image file {str(path)!r} not found: check the path")
        if path.suffix.lower() in VIDEO_SUFFIXES:
            raise DiffalignError(f"{str(path)!r} is a video, not an image: score it with videoreward")
        try:
            with Image.open(path) as img:
                img.load()
                item = img.copy()
        except (OSError, SyntaxError, ValueError) as err:
            raise DiffalignError(f"cannot read image {str(path)!r} ({type(err).__name__}): the file is corrupt or not an image") from None
    if not isinstance(item, Image.Image):
        raise DiffalignError(
            f"cannot score an image of type {type(item).__name__}: pass a tensor, PIL images or file paths"
        )
    return item


def tensor_to_pil(image: Tensor) -> Any:
    """(3, H, W) float in [0, 1] -> uint8 RGB PIL image, rounded as diffusers' `numpy_to_pil`
    (what a user saving a pipeline's output would get)."""
    import numpy as np
    from PIL import Image

    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


def pil_to_tensor(image: Any) -> Tensor:
    """PIL image -> float32 (3, H, W) in [0, 1], as torchvision's ToTensor (RGB conversion first)."""
    import numpy as np

    array = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).float().div(255.0)


def prepare_pixels(
    images: ImageInput,
    transform: Callable[[Tensor], Tensor],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    pil_transform: Callable[[Any], Tensor] | None = None,
    exact: bool = False,
) -> Tensor:
    """Check `images` and return the model input batch on `device` in `dtype`.

    Tensors go through `transform` ((N, 3, H, W) in [0, 1] -> model input, differentiable); a
    tensor batch at once. PIL images and paths go through `pil_transform` (PIL image -> (3, S, S),
    the original's own preprocessing), or `transform` after ToTensor when a reward has none.
    `exact=True` rounds tensors to uint8 PIL images and takes the PIL path too (no gradient).
    A list is transformed item by item, so images of different sizes can share one batch.
    """
    def from_pil(image: Any) -> Tensor:
        if pil_transform is None:
            return transform(pil_to_tensor(image)[None])
        return pil_transform(image)[None]

    if isinstance(images, Tensor):
        check_image_tensor(images)
        pixels = torch.cat([from_pil(tensor_to_pil(x)) for x in images]) if exact else transform(images)
    else:
        items = list(images)
        if not items:
            raise DiffalignError("empty list of images: pass at least one image")
        parts = []
        for item in items:
            if isinstance(item, Tensor):
                item = load_image(item)
                parts.append(from_pil(tensor_to_pil(item)) if exact else transform(item[None]))
            else:
                parts.append(from_pil(load_pil(item)))
        pixels = torch.cat(parts)
    return pixels.to(device=device, dtype=dtype)


def num_images(images: ImageInput) -> int:
    return images.shape[0] if isinstance(images, Tensor) else len(images)


# ----------------------------------------------------------------------------------------
# Differentiable preprocessing: (N, 3, H, W) float -> (N, 3, size, size)
# ----------------------------------------------------------------------------------------


def resize(images: Tensor, height: int, width: int) -> Tensor:
    """Bicubic with antialias, as torchvision's Resize on tensors (no clamping, like it)."""
    if tuple(images.shape[-2:]) == (height, width):
        return images
    return F.interpolate(images, size=(height, width), mode="bicubic", antialias=True, align_corners=False)


def resize_shortest_side(images: Tensor, size: int) -> Tensor:
    """Scale so the shorter side is `size`; the longer one is truncated like torchvision/PIL processors."""
    h, w = images.shape[-2:]
    if h <= w:
        return resize(images, size, int(size * w / h))
    return resize(images, int(size * h / w), size)


def center_crop(images: Tensor, size: int, rounding: str = "round") -> Tensor:
    """Centre crop to size x size; offsets rounded as torchvision's center_crop ("round"), or
    floored as the HF image processors' ("floor")."""
    h, w = images.shape[-2:]
    if h < size or w < size:
        raise DiffalignError(f"image of {h}x{w} is smaller than the {size}px crop: resize it first")
    if rounding == "floor":
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return images[..., top : top + size, left : left + size]


def resize_longest_side_and_pad(images: Tensor, size: int, fill: float = 0.0) -> Tensor:
    """HPSv2's ResizeMaxSize: scale the longer side to `size`, then pad symmetrically (extra
    pixel right/bottom) with `fill` to size x size. Padding comes before normalisation."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    new_h, new_w = round(h * scale), round(w * scale)
    images = resize(images, new_h, new_w)
    pad_h, pad_w = size - new_h, size - new_w
    if pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images - mean_t) / std_t


def clip_crop_transform(
    size: int = 224, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, crop_size: int | None = None, crop_rounding: str = "round"
) -> Callable[[Tensor], Tensor]:
    """CLIP's eval preprocessing in torch: shortest side to `size`, centre crop (to `crop_size`,
    default `size`; offsets as torchvision, or "floor" as the HF processors), normalise."""
    crop = crop_size or size

    def transform(images: Tensor) -> Tensor:
        return normalize(center_crop(resize_shortest_side(images, size), crop, crop_rounding), mean, std)

    return transform


def torchvision_pil_crop_transform(size: int = 224, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, crop_size: int | None = None) -> Callable[[Any], Tensor]:
    """The CLIP/BLIP eval transform on a PIL image with torchvision, in the originals' order
    (ImageReward's `_transform`): Resize(size, bicubic) and CenterCrop on the image in its own
    mode (PIL's bicubic on uint8), then RGB, ToTensor, Normalize. PIL image -> (3, crop, crop)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    crop = crop_size or size

    def transform(image: Any) -> Tensor:
        image = TF.center_crop(TF.resize(image, size, interpolation=InterpolationMode.BICUBIC), crop)
        return TF.normalize(TF.to_tensor(image.convert("RGB")), mean, std)

    return transform


def to_tensor_transform(transform: Callable[[Tensor], Tensor]) -> Callable[[Any], Tensor]:
    """For originals that convert first and resize the tensor (hpsv2's preprocess_val): RGB,
    ToTensor, then `transform`. PIL image -> (3, S, S)."""

    def pil_transform(image: Any) -> Tensor:
        return transform(pil_to_tensor(image)[None])[0]

    return pil_transform


def clip_pad_transform(size: int = 224, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> Callable[[Tensor], Tensor]:
    """HPSv2's preprocess_val in torch: longest side to `size`, zero pad, normalise."""

    def transform(images: Tensor) -> Tensor:
        return normalize(resize_longest_side_and_pad(images, size), mean, std)

    return transform


# ----------------------------------------------------------------------------------------
# Weights: where they are, how they load
# ----------------------------------------------------------------------------------------


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve_weights(path_or_repo: str | Path, filenames: str | Sequence[str], hint: str = "") -> list[Path]:
    """Find `filenames` and return their local paths, in order.

    `path_or_repo` is a file (only with a single filename: the file itself, whatever its name),
    a local folder holding the files, or a hub repo id looked up in the HF cache (downloaded
    unless HF_HUB_OFFLINE=1). Anything missing raises a one-line error that says which files
    to place where; `hint` is appended (e.g. "or pass --reward hpsv2@DIR").
    """
    names = [filenames] if isinstance(filenames, str) else list(filenames)
    where = Path(os.path.expanduser(str(path_or_repo)))
    tail = f"; {hint}" if hint else ""
    if where.is_file():
        if len(names) != 1:
            raise DiffalignError(f"{str(where)!r} is a file but {', '.join(names)} are needed: pass their folder{tail}")
        return [where]
    if where.is_dir():
        missing = [n for n in names if not (where / n).is_file()]
        if missing:
            raise DiffalignError(f"{', '.join(missing)} not found in {str(where)!r}: place the file(s) there{tail}")
        return [where / n for n in names]
    if str(path_or_repo).startswith((".", "/", "~")) or str(path_or_repo).count("/") != 1:
        raise DiffalignError(f"weights path {str(path_or_repo)!r} does not exist: pass a folder with {', '.join(names)}{tail}")
    return [_hub_file(str(path_or_repo), n, names, tail) for n in names]


def _hub_file(repo: str, filename: str, names: list[str], tail: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, local_files_only=hub_offline()))
    except Exception as err:  # offline, no network, not in cache, gated, wrong repo id
        why = "not in the HF cache and HF_HUB_OFFLINE=1" if hub_offline() else type(err).__name__
        raise DiffalignError(
            f"{filename} from hub repo {repo!r} unavailable ({why}): download {', '.join(names)} "
            f"from https://huggingface.co/{repo} into a folder and pass that folder as path{tail}"
        ) from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a `.safetensors` file, or a `.pt`/`.pth`/`.bin` pickle with weights_only=True
    (tensors and plain containers only: no code runs)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DiffalignError(
            f"cannot load {str(path)!r} as a weights-only checkpoint ({type(err).__name__}): "
            "the file is corrupt, truncated, or holds pickled code; re-download it"
        ) from None


def load_state_dict_strict(module: torch.nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    """`module.load_state_dict(state_dict, strict=True)` with one readable error listing the
    missing, unexpected and mis-shaped keys (first few of each)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mis_shaped = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
        if keys:
            shown = ", ".join(keys[:3]) + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise DiffalignError(
            f"checkpoint {source} does not match the model ({'; '.join(problems)}): "
            "check that the file belongs to this reward and architecture"
        )
    module.load_state_dict(state_dict, strict=True)


def freeze(module: torch.nn.Module, device=None, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Eval mode, no parameter gradients, on `device` (default CPU) in `dtype` (default fp32)."""
    module.to(device=torch.device(device or "cpu"), dtype=dtype or torch.float32)
    return module.eval().requires_grad_(False)


def check_scores(scores: Tensor, batch_size: int, name: str) -> Tensor:
    """Enforce the output contract: float32 (B,)."""
    scores = scores.float().reshape(-1)
    if scores.shape[0] != batch_size:
        raise DiffalignError(f"reward {name!r} returned {scores.shape[0]} scores for {batch_size} images: it must return one score per image")
    return scores
