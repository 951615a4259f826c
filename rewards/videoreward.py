"""VideoReward (VideoAlign; Liu et al. 2025, KwaiVGI/VideoAlign, weights KwaiVGI/VideoReward).

A Qwen2-VL-2B-Instruct (transformers' own Qwen2VL classes) reads the sampled video frames and a
rubric prompt holding three special tokens <|VQ_reward|>, <|MQ_reward|>, <|TA_reward|>; a linear
`rm_head` on the last hidden states at those three positions gives visual quality (VQ), motion
quality (MQ) and text alignment (TA). Each is normalised as (r - mean) / std with the release's
`inference_config`, and Overall = VQ + MQ + TA.

Faithful to the original inference code (inference.py, vision_process.py, trainer.py):
- frames: n = round_to_even(clamp(T / video_fps * fps, 4, even(min(768, T)))) at indices
  linspace(0, T-1, n).round(); each frame resized (bicubic, antialias) to multiples of 28 with
  128*28*28 <= pixels <= data_config.max_frame_pixels; the original resizes uint8 frames, so
  the resized values are rounded to integers (straight-through here, gradients still flow);
- the Qwen2-VL processor's rescale (1/255), CLIP mean/std and patch flattening, in torch;
- the prompt rendered with the Qwen2-VL-Instruct chat template (default system turn), right
  padding; the text model runs with plain 1-D positions (the original passes no position ids),
  not Qwen2-VL's 3-D M-RoPE.
Inputs, as the original's `reward(video_paths, ...)` and qwen-vl-utils' `fetch_video` take them:
- video files (mp4, ...): decoded with PyAV (`pip install diffalign[video]`; the same frames as
  decord, the original's reader), n frames chosen from the file's frame count and average frame
  rate, and resized as uint8 with torchvision (the original's call);
- frame folders (image files sorted by name): the original's list-of-frames path: every frame,
  each resized with PIL's default filter to multiples of 28 (min_pixels 4*28*28 there), padded to
  an even count with the last frame;
- tensors (B, T, 3, H, W) in [0, 1], differentiable. They carry no frame rate: they are taken to
  be sampled at `video_fps` (default: the model's `fps`, i.e. every frame is used); pass
  `video_fps=` for raw generator output. `exact=True` rounds them to uint8 and resizes as the
  file path does (no gradient).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffalign.errors import DiffalignError
from diffalign.rewards import base

HUB_REPO = "KwaiVGI/VideoReward"
DIMENSIONS = ("VQ", "MQ", "TA")
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
# vision_process.py constants
IMAGE_FACTOR, FRAME_FACTOR, MAX_RATIO = 28, 2, 200
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 128 * 28 * 28, 768 * 28 * 28
FPS_MIN_FRAMES, FPS_MAX_FRAMES = 4, 768
IMAGE_MIN_PIXELS = 4 * 28 * 28  # fetch_image's default, used for each frame of a frame list
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CHAT_TEMPLATE = (  # Qwen2-VL-Instruct's template for one user turn [video, text] + generation prompt
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|video_pad|><|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n"
)
# prompt_template.py DETAILED_PROMPT_WITH_SPECIAL_TOKEN ("detailed_special"), verbatim: the model
# was trained on this exact text (note the trailing double spaces of the Markdown headings).
PROMPT_TEMPLATE = "\n".join(
    [
        '',
        'You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, Motion Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three categories, with 0 being the worst and 10 being the best. Each evaluation should be independent of the others.',
        '',
        '**Visual Quality:**  ',
        'Evaluate the overall visual quality of the video, with a focus on static factors. The following sub-dimensions should be considered:',
        '- **Reasonableness:** The video should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.',
        '- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to interpret, with no blurring or indistinct areas.',
        '- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).',
        '- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.',
        '- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. ',
        '',
        'Please provide the ratings of Visual Quality: <|VQ_reward|>',
        'END',
        '',
        '**Motion Quality:**  ',
        'Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following sub-dimensions:',
        '- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, or missing body parts).',
        '- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing should flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, mouth movements).',
        '- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different motions or camera angles should be seamless, and the overall dynamic feel should be visually pleasing.',
        '- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend naturally with the background, without obvious artifacts or the feeling of cut-and-paste effects.',
        '- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas where the video might have blurry or unsteady sections that hinder visual continuity.',
        '- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion quality.',
        '',
        'Please provide the ratings of Motion Quality: <|MQ_reward|>',
        'END',
        '',
        '**Text Alignment:**  ',
        'Assess how well the video matches the textual prompt across the following sub-dimensions:',
        '- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.',
        '- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions like talking or blinking) align with the described prompt. The motion should match the prompt in terms of type, scale, and direction.',
        '- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes checking if real-world locations or scenes are accurately represented, though some stylistic adaptation is acceptable.  ',
        '- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the video adheres to this style.',
        '- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) are consistent with the expected behavior from the prompt.',
        '',
        'Textual prompt - {text_prompt}',
        'Please provide the ratings of Text Alignment: <|TA_reward|>',
        'END',
        '',
    ]
)


# ----------------------------------------------------------------------------------------
# Frame sampling and resizing (vision_process.py)
# ----------------------------------------------------------------------------------------


def smart_resize(height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = VIDEO_MAX_PIXELS) -> tuple[int, int]:
    """Height and width as multiples of `factor`, aspect kept, min_pixels <= h*w <= max_pixels."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise DiffalignError(f"video frames of {height}x{width} exceed the aspect ratio {MAX_RATIO}: crop them first")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def sample_frame_count(total: int, video_fps: float, fps: float | None = None, nframes: int | None = None) -> int:
    """smart_nframes: the number of frames the model sees (either `fps` or `nframes`)."""
    if nframes is not None:
        n = round(nframes / FRAME_FACTOR) * FRAME_FACTOR
    else:
        low = math.ceil(FPS_MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
        high = math.floor(min(FPS_MAX_FRAMES, total) / FRAME_FACTOR) * FRAME_FACTOR
        n = round(min(max(total / video_fps * fps, low), high) / FRAME_FACTOR) * FRAME_FACTOR
    n = min(n, total)
    if not FRAME_FACTOR <= n <= total:
        raise DiffalignError(f"a {total}-frame video gives {n} sampled frames: VideoReward needs at least {FRAME_FACTOR} frames")
    return n


def frame_indices(total: int, n: int) -> list[int]:
    return torch.linspace(0, total - 1, n).round().long().tolist()


def resize_frames_uint8_like(frames: Tensor, height: int, width: int) -> Tensor:
    """(T, 3, H, W) in [0, 255] -> bicubic antialiased resize, rounded and clamped to [0, 255]
    as the original's uint8 resize; the rounding is straight-through so gradients flow."""
    if tuple(frames.shape[-2:]) != (height, width):
        frames = F.interpolate(frames, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    frames = frames.clamp(0, 255)
    return frames + (frames.round() - frames).detach()


def resize_frames_uint8(frames: Tensor, height: int, width: int) -> Tensor:
    """fetch_video's resize: (T, 3, H, W) uint8 -> torchvision bicubic antialias on uint8 -> float 0-255."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    return TF.resize(frames, [height, width], interpolation=InterpolationMode.BICUBIC, antialias=True).float()


def decode_video(path: str | Path) -> tuple[list[Any], float]:
    """Decode every frame of a video file with PyAV -> (frames as av.VideoFrame, average fps).

    decord (the original's reader) and torchvision's read_video (its fallback, itself PyAV)
    give the same RGB frames: FFmpeg's rgb24 conversion."""
    with video_stream(path) as stream:
        rate = stream.average_rate or stream.guessed_rate
        frames = list(stream.container.decode(stream))
    if not frames:
        raise DiffalignError(f"video {str(path)!r} has no frames: the file is empty or truncated")
    if not rate:
        raise DiffalignError(f"video {str(path)!r} has no frame rate: re-encode it (e.g. ffmpeg -r 24) or decode it and pass video_fps")
    return frames, float(rate)


def _import_av() -> Any:
    try:
        import av
    except ImportError:
        raise DiffalignError("reading video files needs PyAV: pip install 'diffalign[video]' (or pip install av)") from None
    return av


@contextlib.contextmanager
def video_stream(path: str | Path):
    """The first video stream of a file, open; a missing, corrupt or non-video file (found on
    opening or while the caller decodes) is a one-line DiffalignError."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise DiffalignError(f"video file {str(path)!r} not found: check the path")
    av = _import_av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DiffalignError(f"{str(path)!r} has no video stream: pass a video file or a folder of frames")
            yield container.streams.video[0]
    except DiffalignError:
        raise
    except Exception as err:  # av.error.InvalidDataError and friends, for corrupt or non-video files
        raise DiffalignError(f"cannot decode video {str(path)!r} ({type(err).__name__}): the file is corrupt or not a video") from None


def probe_video(path: str | Path) -> None:
    """Check that `path` is a readable video file or frame folder (no decoding of the whole
    file); a one-line DiffalignError otherwise."""
    path = Path(str(path)).expanduser()
    if path.is_dir():
        frame_files(path)
        return
    with video_stream(path) as stream:
        next(stream.container.decode(stream))


def frame_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise DiffalignError(f"frame folder {str(folder)!r} holds no {'/'.join(FRAME_SUFFIXES)} files: put the frames there")
    return files


def is_video_path(item: Any) -> bool:
    """A directory (of frames) or a file that is not an image by its suffix."""
    if not isinstance(item, (str, os.PathLike)):
        return False
    path = Path(item).expanduser()
    return path.is_dir() or path.suffix.lower() in base.VIDEO_SUFFIXES


def patchify(frames: Tensor, patch: int, merge: int, temporal: int) -> tuple[Tensor, list[int]]:
    """The Qwen2-VL processor's flattening: (T, C, H, W) -> (t*h*w, C*temporal*patch*patch), grid."""
    if pad := -frames.shape[0] % temporal:  # repeat the last frame to a whole temporal patch
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    t, c, h, w = frames.shape
    gt, gh, gw = t // temporal, h // patch, w // patch
    x = frames.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal * patch * patch), [gt, gh, gw]


# ----------------------------------------------------------------------------------------
# The reward module
# ----------------------------------------------------------------------------------------


class VideoRewardReward(nn.Module):
    """VideoReward behind the diffalign contract: `score` is Overall, `score_dimensions` gives
    VQ, MQ, TA and Overall, each (B,) float32 and differentiable w.r.t. tensor videos."""

    name = "videoreward"

    def __init__(self, vlm: nn.Module, rm_head: nn.Linear, tokenizer: Any, *, norm: dict[str, tuple[float, float]] | None = None,
                 fps: float = 2.0, num_frames: int | None = None, max_pixels: int = 240 * 320, video_fps: float | None = None):
        super().__init__()
        self.vlm, self.rm_head, self.tokenizer = vlm, rm_head, tokenizer
        self.special_ids = tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS))
        self.norm = norm  # {"VQ": (mean, std), ...}, or None for raw head outputs
        self.fps, self.num_frames, self.max_pixels = fps, num_frames, max_pixels
        self.video_fps = video_fps or fps  # tensors are taken as already sampled at the model's fps
        vision = vlm.config.vision_config
        self.patch, self.merge, self.temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        # vision_process.py's 28 = patch * merge and its pixel bounds, in those units
        self.factor = self.patch * self.merge
        self.min_pixels = VIDEO_MIN_PIXELS // IMAGE_FACTOR**2 * self.factor**2

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device=None, dtype: torch.dtype | None = None, **opts: Any) -> "VideoRewardReward":
        """Load a VideoAlign release folder (model_config.json + checkpoint-<step>/), default the
        hub repo KwaiVGI/VideoReward. Options: `base_model` (folder or hub id of
        Qwen2-VL-2B-Instruct: config.json + tokenizer, plus weights for adapter checkpoints;
        default model_config's model_name_or_path), `step`, `fps`, `num_frames`, `max_pixels`,
        `video_fps` (frame rate of tensor videos), `use_norm` (default True)."""
        return load_videoreward(path or HUB_REPO, device, dtype, **opts)

    def score(self, videos: Any, prompts: base.PromptInput, *, exact: bool = False) -> Tensor:
        """Overall, (B,) float32. `videos`: a (B, T, 3, H, W) tensor in [0, 1], or a list of
        (T, 3, H, W) tensors, video file paths and frame folders."""
        return self.score_dimensions(videos, prompts, exact=exact)["Overall"]

    def forward(self, videos: Any, prompts: base.PromptInput, *, exact: bool = False) -> Tensor:
        return self.score(videos, prompts, exact=exact)

    def score_dimensions(self, videos: Any, prompts: base.PromptInput, *, exact: bool = False) -> dict[str, Tensor]:
        clips = self._clips(videos)
        prompts = base.check_prompts(prompts, len(clips))
        patches, grids = zip(*(self._patches(self.frames(clip, exact)) for clip in clips))
        input_ids, attention_mask = self._tokens(prompts, grids)
        raw = self._raw_rewards(input_ids, attention_mask, torch.cat(patches), torch.tensor(grids))
        out = {}
        for i, dim in enumerate(DIMENSIONS):
            mean, std = self.norm[dim] if self.norm else (0.0, 1.0)
            out[dim] = base.check_scores((raw[:, i] - mean) / std, len(clips), self.name)
        out["Overall"] = out["VQ"] + out["MQ"] + out["TA"]
        return out

    def _clips(self, videos: Any) -> list[Any]:
        """(B, T, 3, H, W) tensor, or a list of (T, 3, H, W) tensors in [0, 1], video files and
        frame folders -> list of clips (tensors checked, paths kept)."""
        if isinstance(videos, Tensor):
            return list(base.check_image_tensor(videos, video=True))
        if not isinstance(videos, (list, tuple)):
            raise DiffalignError(f"videos of type {type(videos).__name__}: pass a (B, T, 3, H, W) tensor or a list of tensors / video paths")
        clips = list(videos)
        if not clips:
            raise DiffalignError("empty list of videos: pass at least one video (tensor, video file or frame folder)")
        out = []
        for clip in clips:
            if isinstance(clip, Tensor):
                out.append(base.check_image_tensor(clip[None], video=True)[0])
            elif isinstance(clip, (str, os.PathLike)):
                out.append(Path(clip).expanduser())
            else:
                raise DiffalignError(f"cannot score a video of type {type(clip).__name__}: pass (T, 3, H, W) tensors, video file paths or frame folders")
        return out

    def frames(self, clip: Tensor | Path, exact: bool = False) -> Tensor:
        """The frames the model sees, as fetch_video returns them: (n, 3, h, w) float in 0-255,
        h and w multiples of 28. Differentiable for tensors unless `exact`."""
        if isinstance(clip, Path):
            return self._frame_folder(clip) if clip.is_dir() else self._video_file(clip)
        total = clip.shape[0]
        frames = clip[frame_indices(total, self._frame_count(total, self.video_fps))]
        height, width = smart_resize(*frames.shape[-2:], self.factor, self.min_pixels, self.max_pixels)
        if exact:  # the uint8 frames a decoder would give, resized as the original does
            return resize_frames_uint8((frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8), height, width)
        return resize_frames_uint8_like(frames.float() * 255.0, height, width)

    def _frame_count(self, total: int, video_fps: float) -> int:
        fps = None if self.num_frames else self.fps
        return sample_frame_count(total, video_fps, fps, self.num_frames)

    def _video_file(self, path: Path) -> Tensor:
        """fetch_video on a file: decode, n frames at linspace(0, T-1, n).round(), uint8 resize."""
        import numpy as np

        decoded, video_fps = decode_video(path)
        chosen = [decoded[i] for i in frame_indices(len(decoded), self._frame_count(len(decoded), video_fps))]
        frames = torch.from_numpy(np.stack([f.to_ndarray(format="rgb24") for f in chosen])).permute(0, 3, 1, 2)
        height, width = smart_resize(*frames.shape[-2:], self.factor, self.min_pixels, self.max_pixels)
        return resize_frames_uint8(frames.contiguous(), height, width)

    def _frame_folder(self, folder: Path) -> Tensor:
        """fetch_video on a list of frames: every frame, each through fetch_image (RGB, smart_resize
        with the image minimum, PIL `resize` with its default filter), padded to an even count."""
        frames = []
        for file in frame_files(folder):
            image = base.load_pil(file).convert("RGB")
            height, width = smart_resize(image.height, image.width, self.factor, IMAGE_MIN_PIXELS // IMAGE_FACTOR**2 * self.factor**2, self.max_pixels)
            frames.append(base.pil_to_tensor(image.resize((width, height))) * 255.0)
        if len({tuple(f.shape) for f in frames}) != 1:
            raise DiffalignError(f"frames in {str(folder)!r} differ in size: every frame of a video needs the same height and width")
        if len(frames) % FRAME_FACTOR:
            frames.append(frames[-1])
        return torch.stack(frames)

    def _patches(self, frames: Tensor) -> tuple[Tensor, list[int]]:
        """The Qwen2-VL processor for (n, 3, h, w) frames in 0-255: rescale, CLIP mean/std, patches."""
        frames = base.normalize(frames / 255.0, base.OPENAI_CLIP_MEAN, base.OPENAI_CLIP_STD)
        return patchify(frames, self.patch, self.merge, self.temporal)

    def _tokens(self, prompts: list[str], grids: tuple[list[int], ...]) -> tuple[Tensor, Tensor]:
        texts = []
        for prompt, (t, h, w) in zip(prompts, grids):
            text = CHAT_TEMPLATE.format(text=PROMPT_TEMPLATE.format(text_prompt=prompt))
            # the processor expands <|video_pad|> to one token per merged patch
            texts.append(text.replace("<|video_pad|>", "<|video_pad|>" * (t * h * w // self.merge**2)))
        batch = self.tokenizer(texts, padding=True, return_tensors="pt")
        return batch.input_ids, batch.attention_mask

    def _raw_rewards(self, input_ids: Tensor, attention_mask: Tensor, patches: Tensor, grid_thw: Tensor) -> Tensor:
        """trainer.Qwen2VLRewardModelBT.forward with reward_token='special' -> (B, 3)."""
        device = self.rm_head.weight.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        text_model, visual = self.vlm.model.language_model, self.vlm.model.visual
        embeds = text_model.embed_tokens(input_ids)
        video = visual(patches.to(device, embeds.dtype), grid_thw=grid_thw.to(device)).pooler_output
        video_mask = input_ids == self.vlm.config.video_token_id
        if video_mask.sum() != video.shape[0]:
            raise DiffalignError("a prompt contains <|video_pad|>: remove Qwen2-VL special tokens from the prompts")
        embeds = embeds.masked_scatter(video_mask[..., None].expand_as(embeds), video.to(embeds.dtype))
        # 1-D positions in every M-RoPE section, as the original (no position ids given)
        positions = torch.arange(input_ids.shape[1], device=device).expand_as(input_ids)
        hidden = text_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions, use_cache=False).last_hidden_state
        logits = self.rm_head(hidden)  # (B, L, output_dim)
        special = torch.isin(input_ids, torch.tensor(self.special_ids, device=device))
        if (special.sum(1) != len(REWARD_TOKENS)).any():
            raise DiffalignError("a prompt contains a <|XX_reward|> token: remove VideoReward's special tokens from the prompts")
        pooled = logits[special].view(input_ids.shape[0], len(REWARD_TOKENS), -1)  # (B, 3, output_dim)
        if pooled.shape[-1] == len(REWARD_TOKENS):
            pooled = pooled.diagonal(dim1=1, dim2=2)  # VQ from head 0 at the VQ token, ...
        return pooled.reshape(input_ids.shape[0], -1).float()


# ----------------------------------------------------------------------------------------
# Loading a VideoAlign release
# ----------------------------------------------------------------------------------------


def load_videoreward(path: str | Path, device, dtype, **opts: Any) -> VideoRewardReward:
    unknown = set(opts) - {"base_model", "step", "fps", "num_frames", "max_pixels", "video_fps", "use_norm"}
    if unknown:
        raise DiffalignError(f"unknown videoreward options {sorted(unknown)}: use base_model, step, fps, num_frames, max_pixels, video_fps, use_norm")
    folder = release_folder(path)
    config = json.loads((folder / "model_config.json").read_text())
    data_cfg, model_cfg, lora_cfg = config["data_config"], config["model_config"], config["peft_lora_config"]
    if not model_cfg.get("use_special_tokens") or data_cfg.get("prompt_template_type") != "detailed_special":
        raise DiffalignError(f"{folder} is not a special-token VideoReward release (use_special_tokens with the detailed_special prompt): only that layout is supported")
    checkpoint = checkpoint_dir(folder, opts.get("step"))
    base_model = opts.get("base_model") or model_cfg["model_name_or_path"]
    if (folder / str(base_model)).is_dir():  # a relative path in model_config.json
        base_model = folder / str(base_model)
    tokenizer = load_tokenizer(base_model)
    full = checkpoint / "model.pth"
    vlm = build_vlm(base_model, len(tokenizer), with_weights=not full.is_file())
    inference = config.get("inference_config")
    norm = {d: (inference[f"{d}_mean"], inference[f"{d}_std"]) for d in DIMENSIONS} if inference and opts.get("use_norm", True) else None
    model = VideoRewardReward(
        vlm, nn.Linear(vlm.config.text_config.hidden_size, model_cfg.get("output_dim", 1), bias=False), tokenizer, norm=norm,
        fps=opts.get("fps", data_cfg.get("fps", 2.0)), num_frames=opts.get("num_frames", data_cfg.get("num_frames")),
        max_pixels=opts.get("max_pixels", data_cfg.get("max_frame_pixels", 240 * 320)), video_fps=opts.get("video_fps"),
    )
    if full.is_file():
        state = to_transformers_layout(base.load_checkpoint(full), lora_scale(checkpoint, lora_cfg))
    else:  # base weights + trained non-LoRA weights + merged LoRA
        base_state = model.state_dict()
        trained = base.load_checkpoint(base.resolve_weights(checkpoint, "non_lora_state_dict.pth")[0])
        adapter = base.load_checkpoint(base.resolve_weights(checkpoint, "adapter_model.safetensors")[0])
        trained = to_transformers_layout(trained, 1.0)
        if "rm_head.weight" not in trained or set(trained) - set(base_state):
            raise DiffalignError(f"{checkpoint}/non_lora_state_dict.pth lacks rm_head.weight or has keys the model lacks: re-download the checkpoint")
        state = to_transformers_layout(adapter, lora_scale(checkpoint, lora_cfg), {**base_state, **trained})
        state = {**base_state, **trained, **state}
    if vlm.config.tie_word_embeddings and "vlm.model.language_model.embed_tokens.weight" in state:
        # one tied parameter: the (trained) embedding table is the lm_head, whatever else was saved
        state["vlm.lm_head.weight"] = state["vlm.model.language_model.embed_tokens.weight"]
    base.load_state_dict_strict(model, state, str(checkpoint))
    return base.freeze(model, device, dtype)


def release_folder(path: str | Path) -> Path:
    where = Path(str(path)).expanduser()
    if where.is_dir():
        if not (where / "model_config.json").is_file():
            raise DiffalignError(f"model_config.json not found in {str(where)!r}: pass the VideoReward release folder (model_config.json + checkpoint-<step>/)")
        return where
    if str(path).startswith((".", "/", "~")) or str(path).count("/") != 1:
        raise DiffalignError(f"VideoReward path {str(path)!r} does not exist: pass a folder with model_config.json and checkpoint-<step>/")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path), local_files_only=base.hub_offline()))
    except Exception as err:  # offline, not cached, no network
        raise DiffalignError(
            f"VideoReward repo {str(path)!r} unavailable ({type(err).__name__}): download https://huggingface.co/{path} "
            "(model_config.json + checkpoint-<step>/) into a folder and pass it as path"
        ) from None


def checkpoint_dir(folder: Path, step: int | None = None) -> Path:
    """checkpoint-<step>/, the newest one (largest step) by default, as load_model_from_checkpoint."""
    found = {int(p.name.rsplit("-", 1)[-1]): p for p in folder.glob("checkpoint-*") if p.name.rsplit("-", 1)[-1].isdigit()}
    if not found:
        raise DiffalignError(f"no checkpoint-<step>/ folder in {str(folder)!r}: place the release's checkpoint folder there")
    if step is not None and int(step) not in found:
        raise DiffalignError(f"checkpoint-{step} not in {str(folder)!r}: pass one of steps {sorted(found)}")
    return found[int(step) if step is not None else max(found)]


def lora_scale(checkpoint: Path, lora_cfg: dict[str, Any]) -> float:
    """PEFT's LoRA scaling alpha / r (alpha / sqrt(r) with rsLoRA); adapter_config.json wins."""
    adapter = checkpoint / "adapter_config.json"
    if adapter.is_file():
        cfg = json.loads(adapter.read_text())
        r, alpha, rslora = cfg["r"], cfg["lora_alpha"], cfg.get("use_rslora", False)
    else:
        r, alpha, rslora = lora_cfg["lora_r"], lora_cfg["lora_alpha"], lora_cfg.get("use_rslora", False)
    return alpha / math.sqrt(r) if rslora else alpha / r


def _rename(key: str) -> str:
    """Original (transformers 4.45) Qwen2-VL keys -> this module's (transformers 5 layout)."""
    if key.startswith(("model.language_model.", "model.visual.")):  # already the new layout
        return "vlm." + key
    for old, new in (("visual.", "vlm.model.visual."), ("model.", "vlm.model.language_model."), ("lm_head.", "vlm.lm_head.")):
        if key.startswith(old):
            return new + key[len(old):]
    return key  # rm_head.weight, or an unknown key that the strict load reports


def to_transformers_layout(state: dict[str, Tensor], scale: float, base_weights: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Strip PEFT's `base_model.model.`, rename to the transformers 5 layout, and merge each LoRA
    pair into its weight: W = W0 + scale * B @ A (W0 from `state` or `base_weights`)."""
    plain: dict[str, Tensor] = {}
    lora: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        key = key.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")
        if ".original_module." in key:  # PEFT's frozen copy beside a modules_to_save module
            continue
        if ".lora_" in key:
            module, _, rest = key.partition(".lora_")
            if rest[:2] not in ("A.", "B."):
                raise DiffalignError(f"unsupported LoRA tensor {key}: only linear LoRA (lora_A/lora_B) can be merged")
            lora.setdefault(_rename(module), {})[rest[0]] = value
        else:
            plain[_rename(key.replace(".base_layer.", "."))] = value
    for module, pair in lora.items():
        weight = module + ".weight"
        w0 = plain.get(weight, (base_weights or {}).get(weight))
        if w0 is None or set(pair) != {"A", "B"}:
            raise DiffalignError(f"LoRA for {module} has no base weight or lacks lora_A/lora_B: the checkpoint is incomplete")
        plain[weight] = (w0.float() + scale * (pair["B"].float() @ pair["A"].float())).to(w0.dtype)
    return plain


def load_tokenizer(base_model: str | Path) -> Any:
    """The base model's tokenizer + the three reward tokens, right padding (create_model_and_processor)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base_model), local_files_only=base.hub_offline())
    except Exception as err:
        raise DiffalignError(_base_model_hint(base_model, err)) from None
    tokenizer.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
    tokenizer.padding_side = "right"
    return tokenizer


def build_vlm(base_model: str | Path, vocab_size: int, with_weights: bool) -> nn.Module:
    """Qwen2-VL with its embedding table sized to the tokenizer (resize_token_embeddings(len(tok))
    in the original). Without weights, parameters stay uninitialised: the checkpoint fills them."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.initialization import no_init_weights

    try:
        if with_weights:
            vlm = Qwen2VLForConditionalGeneration.from_pretrained(str(base_model), dtype=torch.float32, attn_implementation="sdpa", local_files_only=base.hub_offline())
            vlm.resize_token_embeddings(vocab_size)
            return vlm
        config = Qwen2VLConfig.from_pretrained(str(base_model), local_files_only=base.hub_offline())
    except DiffalignError:
        raise
    except Exception as err:
        raise DiffalignError(_base_model_hint(base_model, err)) from None
    config.text_config.vocab_size = vocab_size
    config._attn_implementation = "sdpa"
    with no_init_weights():
        return Qwen2VLForConditionalGeneration(config)


def _base_model_hint(base_model: str | Path, err: Exception) -> str:
    return (
        f"Qwen2-VL base model {str(base_model)!r} unavailable ({type(err).__name__}): place Qwen2-VL-2B-Instruct's config.json "
        "and tokenizer files (plus its weights for adapter checkpoints) in a folder and pass base_model=FOLDER"
    )
