"""The step-aware preference model (SPM) of SPO (Liang et al. 2025, RockeyCoss/SPO).

A CLIP (PickScore's ViT-H-14 layout) whose vision tower is conditioned on the diffusion
timestep t: t -> sinusoidal features (256) -> MLP -> c (the vision width); every vision block
modulates its two pre-norms DiT-style, `adaLN_modulation(c) = (shift, scale, gate) x 2`,

    h = h + gate_msa * attn(layer_norm1(h) * (1 + scale_msa) + shift_msa)
    h = h + gate_mlp * mlp(layer_norm2(h) * (1 + scale_mlp) + shift_mlp)

and the pooled output is modulated once more, `pooled * (1 + scale) + shift`. The score is
PickScore's, `logit_scale.exp() * cosine(image, text)`, computed as the original's
`get_preference_score`: bicubic resize of the shortest side to 224 (no antialias), centre crop,
clamp, OpenAI normalisation; the prompt padded to 77 tokens.

Initialisation (the original's `init_adaln_paras`): from any CLIPModel in PickScore's layout
(`SPMReward.from_clip`), every block's modulation starts with zero weights and a zero bias
except the two gates (bias 1), the pooled modulation starts at zero, and the timestep MLP's
weights are N(0, 0.02): shift = scale = 0, gate = 1 whatever t is, so a fresh SPM scores
exactly as the CLIP it came from until training moves the modulation. `diffalign train-spm`
trains it; `state_files` is what it saves (config.json, the tokenizer, the state dict in the
original key layout), which `--reward spm@FOLDER` loads strictly.

Weights: the released `sd-v1-5_step-aware_preference_model.bin` and
`sdxl_step-aware_preference_model.bin` are torch state dicts of the original
`StepAwarePreferenceModel` (keys `model.text_model.*`, `model.vision_model.*`,
`model.t_embedder.*`, ...). They load with `weights_only=True`, strictly (old checkpoints'
`position_ids` buffers aside). The architecture comes from PickScore_v1's config.json and the
tokenizer from the CLIP-H processor, or from `path` itself when it is a folder holding
config.json, the tokenizer files and one `.bin`/`.safetensors` state dict.

    reward = load_reward("spm", path="sd-v1-5_step-aware_preference_model.bin")
    scores = reward.score(images, prompts, t=torch.tensor([501, 501]))  # t = 0: a clean image
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffalign.errors import DiffalignError
from diffalign.rewards.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageInput,
    PromptInput,
    check_batch,
    check_scores,
    freeze,
    load_checkpoint,
    load_image,
    load_state_dict_strict,
    normalize,
)

CONFIG_REPO = "yuvalkirstain/PickScore_v1"
PROCESSOR_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
FREQUENCY_DIM = 256  # the timestep embedder's sinusoidal features (DiT's TimestepEmbedder)


WEIGHTS_NAME = "step_aware_preference_model.safetensors"  # what `state_files` writes


def check_clip_source(path: str) -> None:
    """A local --init must be a CLIP folder (config.json of model_type clip, and weights); hub
    ids are checked when they load. One line, before any model loads."""
    import json

    where = Path(path).expanduser()
    if not where.exists():
        if where.is_absolute() or path.startswith(".") or path.count("/") != 1:
            raise DiffalignError(f"--init {path!r} not found: pass a PickScore-layout CLIP folder or hub id "
                                 "(e.g. yuvalkirstain/PickScore_v1)")
        return  # a hub id
    config = where / "config.json"
    kind = json.loads(config.read_text()).get("model_type") if config.is_file() and where.is_dir() else None
    if kind != "clip":
        found = f"model_type {kind!r}" if kind else "no config.json"
        raise DiffalignError(f"--init {path!r} is not a CLIPModel folder ({found}): pass a PickScore-layout CLIP "
                             "(config.json with model_type clip, its weights and tokenizer), e.g. toy-reward's folder")
    if not any(where.glob("*.safetensors")) and not any(where.glob("*.bin")):
        raise DiffalignError(f"--init {path!r} has no weights (.safetensors or .bin): pass the CLIP's full folder")


def adaln(dim: int, chunks: int) -> nn.Sequential:
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, chunks * dim, bias=True))


def timestep_features(t: Tensor, dim: int = FREQUENCY_DIM, max_period: int = 10000) -> Tensor:
    """DiT's sinusoidal timestep features: [cos(t f), sin(t f)], f = max_period^(-i / (dim / 2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_features(t).to(self.mlp[0].weight.dtype))


class TimeConditionedCLIP(nn.Module):
    """The original `HFTimeConditionedCLIPModel`'s parameters, by name: a transformers CLIPModel
    with `adaLN_modulation` in every vision block and after the pooled output, and `t_embedder`."""

    def __init__(self, config: Any):
        super().__init__()
        from transformers import CLIPModel

        clip = CLIPModel(config)
        self.text_model, self.vision_model = clip.text_model, clip.vision_model
        self.visual_projection, self.text_projection, self.logit_scale = (
            clip.visual_projection, clip.text_projection, clip.logit_scale)
        self.config = config
        width = config.vision_config.hidden_size
        for layer in self.vision_model.encoder.layers:
            layer.adaLN_modulation = adaln(width, 6)
        self.vision_model.adaLN_modulation = adaln(width, 2)
        self.t_embedder = TimestepEmbedder(width)
        self.clip = [clip]  # the get_text_features wrapper, kept out of the state dict

    def image_features(self, pixels: Tensor, t: Tensor) -> Tensor:
        vision = self.vision_model
        c = self.t_embedder(t.to(pixels.device))
        h = vision.pre_layrnorm(vision.embeddings(pixels))
        for layer in vision.encoder.layers:
            shift1, scale1, gate1, shift2, scale2, gate2 = layer.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=2)
            attn = layer.self_attn(hidden_states=layer.layer_norm1(h) * (1 + scale1) + shift1)[0]
            h = h + gate1 * attn
            h = h + gate2 * layer.mlp(layer.layer_norm2(h) * (1 + scale2) + shift2)
        pooled = vision.post_layernorm(h[:, 0])
        shift, scale = vision.adaLN_modulation(c).chunk(2, dim=1)
        return self.visual_projection(pooled * (1 + scale) + shift)

    def init_adaln(self, generator: torch.Generator | None = None) -> None:
        """The original's `init_adaln_paras`: gates 1, shifts and scales 0 at every t (a fresh SPM
        is its CLIP), the timestep MLP's weights N(0, 0.02) and its biases 0."""
        width = self.config.vision_config.hidden_size
        with torch.no_grad():
            for layer in self.vision_model.encoder.layers:
                linear = layer.adaLN_modulation[-1]
                linear.weight.zero_()
                linear.bias.zero_()
                linear.bias[2 * width: 3 * width] = 1  # gate_msa
                linear.bias[5 * width:] = 1  # gate_mlp
            self.vision_model.adaLN_modulation[-1].weight.zero_()
            self.vision_model.adaLN_modulation[-1].bias.zero_()
            for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
                linear.weight.normal_(0, 0.02, generator=generator)
                linear.bias.zero_()

    def text_features(self, input_ids: Tensor) -> Tensor:
        text = self.clip[0].get_text_features(input_ids=input_ids)
        return text if isinstance(text, Tensor) else text.pooler_output  # transformers 5: an output object


class StepAwarePreferenceModel(nn.Module):
    """The container whose state dict the released checkpoints hold (`model.` prefix)."""

    def __init__(self, config: Any):
        super().__init__()
        self.model = TimeConditionedCLIP(config)


class SPMReward(nn.Module):
    def __init__(self, spm: StepAwarePreferenceModel, tokenizer: Any, size: int = 224,
                 mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, name: str = "spm"):
        super().__init__()
        self.spm = spm
        self.tokenizer = tokenizer
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self.name = name

    @classmethod
    def from_pretrained(cls, path: str | None = None, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None, *, config: str | None = None, processor: str | None = None,
                        name: str = "spm") -> "SPMReward":
        """`path`: the .bin state dict, or a folder with config.json, tokenizer files and one
        state dict; `config`: the CLIPConfig source (default PickScore_v1's); `processor`: the
        tokenizer/image-processor source (default the CLIP-H one)."""
        from transformers import AutoTokenizer, CLIPConfig

        if path is None:
            raise DiffalignError("spm needs its weights: download sd-v1-5_step-aware_preference_model.bin (or the SDXL one) "
                                 "from the SPO release and pass --reward spm@FILE")
        where = Path(path).expanduser()
        if where.is_dir():
            found = sorted(p for p in where.iterdir() if p.suffix in (".bin", ".safetensors", ".pt"))
            if len(found) != 1:
                raise DiffalignError(f"{str(where)!r} must hold one state dict (.bin/.safetensors), found "
                                     f"{len(found)}: pass the file itself with --reward spm@FILE")
            weights, config, processor = found[0], config or str(where), processor or str(where)
        elif where.is_file():
            weights = where
        else:
            raise DiffalignError(f"spm weights {str(path)!r} not found: pass the .bin file or its folder")
        try:
            clip_config = CLIPConfig.from_pretrained(config or CONFIG_REPO)
            tokenizer = AutoTokenizer.from_pretrained(processor or PROCESSOR_REPO)
        except OSError:
            raise DiffalignError(f"spm's CLIP config ({config or CONFIG_REPO}) or tokenizer ({processor or PROCESSOR_REPO}) "
                                 "is unavailable offline: put config.json and the tokenizer files next to the weights "
                                 "and pass that folder as --reward spm@DIR") from None
        spm = StepAwarePreferenceModel(clip_config)
        state = load_checkpoint(weights)
        own = spm.state_dict()
        state = {k: v for k, v in state.items() if not (k.endswith("position_ids") and k not in own)}
        load_state_dict_strict(spm, state, str(weights))
        size = clip_config.vision_config.image_size
        return cls(freeze(spm, device, dtype), tokenizer, size=size, name=name).eval()

    @classmethod
    def from_clip(cls, path: str, device: torch.device | str | None = None, *, seed: int = 0,
                  name: str = "spm") -> "SPMReward":
        """A trainable SPM initialised from a CLIPModel in PickScore's layout (a folder with
        config.json, weights and tokenizer files, or a hub id such as yuvalkirstain/PickScore_v1;
        a folder without tokenizer files takes the CLIP-H one): the CLIP's weights under `model.`,
        the modulation as `init_adaln` (seeded), so its scores equal the CLIP's at any t."""
        from transformers import AutoTokenizer, CLIPConfig, CLIPModel

        check_clip_source(path)
        where = Path(path).expanduser()
        local = where.is_dir()
        try:
            config = CLIPConfig.from_pretrained(str(where) if local else path)
            clip = CLIPModel.from_pretrained(str(where) if local else path, dtype=torch.float32)
        except (OSError, ValueError) as err:
            raise DiffalignError(f"--init {path!r} is not a loadable CLIPModel ({str(err).splitlines()[0][:120]}): pass a "
                                 "PickScore-layout CLIP folder or hub id (e.g. yuvalkirstain/PickScore_v1, toy-reward)") from None
        has_tokenizer = local and any((where / f).is_file() for f in ("vocab.json", "tokenizer.json"))
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(where) if has_tokenizer or not local else PROCESSOR_REPO)
        except OSError:
            raise DiffalignError(f"no tokenizer for --init {path!r}: put CLIP's tokenizer files (vocab.json, merges.txt) "
                                 "in the folder") from None
        spm = StepAwarePreferenceModel(config)
        own = spm.model.state_dict()
        state = {k: v for k, v in clip.state_dict().items() if not (k.endswith("position_ids") and k not in own)}
        new = ("adaLN_modulation", "t_embedder")
        load_state_dict_strict(spm.model, {**{k: v for k, v in own.items() if any(n in k for n in new)}, **state},
                               f"--init {path}")
        spm.model.init_adaln(torch.Generator().manual_seed(seed))
        spm.to(device=torch.device(device or "cpu"), dtype=torch.float32)
        return cls(spm, tokenizer, size=config.vision_config.image_size, name=name).eval()

    def state_files(self, dtype: torch.dtype | None = None) -> dict[str, bytes]:
        """{file name: bytes} of a folder `from_pretrained` (and `--reward spm@FOLDER`) loads:
        config.json, the tokenizer files and the state dict in the original key layout
        (`model.text_model.*`, `model.vision_model.*`, `model.t_embedder.*`, ...) as safetensors,
        in `dtype` (default the weights' own; the loader upcasts to its dtype)."""
        import tempfile

        from safetensors.torch import save

        state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in self.spm.state_dict().items()}
        files = {"config.json": (self.spm.model.config.to_json_string(use_diff=False)).encode("utf-8")}
        with tempfile.TemporaryDirectory() as tmp:
            self.tokenizer.save_pretrained(tmp)
            files.update({p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()})
        files[WEIGHTS_NAME] = save(state)
        return files

    def pixels(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) in [0, 1] -> the model input, as the original's get_preference_score."""
        h, w = images.shape[-2:]
        scale = self.size / min(h, w)
        size = (int(h * scale + 0.5), int(w * scale + 0.5))
        images = F.interpolate(images, size=size, mode="bicubic", align_corners=False)
        if size[0] != size[1]:
            top, left = int(round((size[0] - self.size) / 2.0)), int(round((size[1] - self.size) / 2.0))
            images = images[..., top: top + self.size, left: left + self.size]
        return normalize(images.clamp(0, 1).float(), self.mean, self.std)

    def score(self, images: ImageInput, prompts: PromptInput, *, t: Tensor | int = 0, exact: bool = False) -> Tensor:
        """(B,) float32 at timestep `t` (an int or (B,); 0 scores a clean image). Tensors are
        differentiable; PIL images and files are read to tensors first (the original has
        only the tensor path, so `exact` changes nothing)."""
        prompts = check_batch(images, prompts)
        if not isinstance(images, Tensor):
            images = torch.stack([load_image(item) for item in images])
        param = self.spm.model.logit_scale
        pixels = self.pixels(images.to(param.device)).to(param.dtype)
        t = torch.as_tensor(t, device=param.device).reshape(-1).expand(len(prompts))
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids.to(param.device)
        model = self.spm.model
        image = F.normalize(model.image_features(pixels, t).float(), dim=-1)
        text = F.normalize(model.text_features(tokens).float(), dim=-1)
        return check_scores(model.logit_scale.float().exp() * (image * text).sum(dim=-1), len(prompts), self.name)

    def forward(self, images: ImageInput, prompts: PromptInput, *, t: Tensor | int = 0) -> Tensor:
        return self.score(images, prompts, t=t)


def toy_spm(path: str | None = None, device: torch.device | str | None = None,
            dtype: torch.dtype | None = None, **opts: Any) -> SPMReward:
    """The toy world's SPM (assets/toy-spm): toy-reward's CLIP with the timestep modulation,
    trained with `diffalign train-spm` on toy-sd's pairs (tools/toy/spm.py)."""
    if path is None:
        # As rewards/toy.py, the one exception to "rewards import only diffalign.errors": the asset path.
        from diffalign.paths import asset

        folder = asset("toy-spm")
        if not (folder / "config.json").is_file():
            raise DiffalignError(f"toy asset {str(folder)!r} is missing: build it from a clone with "
                                 "`python -m tools.toy build --only toy-spm` or pass path=<folder>")
        path = str(folder)
    return SPMReward.from_pretrained(path, device, dtype, name=opts.pop("name", "toy-spm"), **opts)
