"""The step-aware preference model: the original `StepAwarePreferenceModel` state-dict layout
loads strictly, and the score at t equals an independent functional computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffalign.errors import DiffalignError
from diffalign.rewards import load_reward

from helpers import tiny_hf_clip_config


def original_layout(config, seed: int = 0) -> dict:
    """A state dict with the original's keys: CLIP's under `model.`, adaLN in every vision block
    (6 x width) and after the pooled output (2 x width), the timestep MLP (256 -> width -> width),
    and the old `position_ids` buffer. Random adaLN weights, so t matters."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    state = {f"model.{k}": v for k, v in CLIPModel(config).state_dict().items()}
    d = config.vision_config.hidden_size
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(config.vision_config.num_hidden_layers):
        state[f"model.vision_model.encoder.layers.{i}.adaLN_modulation.1.weight"] = 0.05 * torch.randn(6 * d, d, generator=g)
        state[f"model.vision_model.encoder.layers.{i}.adaLN_modulation.1.bias"] = 1 + 0.05 * torch.randn(6 * d, generator=g)
    state["model.vision_model.adaLN_modulation.1.weight"] = 0.05 * torch.randn(2 * d, d, generator=g)
    state["model.vision_model.adaLN_modulation.1.bias"] = 0.05 * torch.randn(2 * d, generator=g)
    state["model.t_embedder.mlp.0.weight"] = 0.02 * torch.randn(d, 256, generator=g)
    state["model.t_embedder.mlp.0.bias"] = torch.zeros(d)
    state["model.t_embedder.mlp.2.weight"] = 0.02 * torch.randn(d, d, generator=g)
    state["model.t_embedder.mlp.2.bias"] = torch.zeros(d)
    state["model.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return state


@pytest.fixture(scope="module")
def spm_folder(tmp_path_factory):
    from diffalign.rewards.clip_tokenizer import write_clip_tokenizer

    config = tiny_hf_clip_config()
    folder = tmp_path_factory.mktemp("spm")
    config.save_pretrained(folder)
    write_clip_tokenizer(folder)
    torch.save(original_layout(config), folder / "sd-v1-5_step-aware_preference_model.bin")
    return folder


def reference_score(state: dict, config, images: torch.Tensor, input_ids: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """StepAwarePreferenceModel.get_preference_score written out from the state dict."""
    from torchvision import transforms
    from transformers import CLIPModel

    s = {k[len("model."):]: v.float() for k, v in state.items() if "position_ids" not in k}
    v = config.vision_config
    d, heads = v.hidden_size, v.num_attention_heads
    # preprocessing, as the original: [-1, 1] images, bicubic, centre crop, back to [0, 1], normalise
    x = images * 2 - 1
    scale = 224 / min(x.shape[-2:])
    x = F.interpolate(x, size=(int(x.shape[-2] * scale + 0.5), int(x.shape[-1] * scale + 0.5)), mode="bicubic",
                      align_corners=False)
    x = transforms.CenterCrop(224)(x)
    x = transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))((x / 2 + 0.5).clamp(0, 1))
    # timestep embedding (DiT)
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    feat = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    c = F.linear(F.silu(F.linear(feat, s["t_embedder.mlp.0.weight"], s["t_embedder.mlp.0.bias"])),
                 s["t_embedder.mlp.2.weight"], s["t_embedder.mlp.2.bias"])
    # vision tower with adaLN
    p = "vision_model."
    patches = F.conv2d(x, s[p + "embeddings.patch_embedding.weight"], stride=v.patch_size).flatten(2).transpose(1, 2)
    cls = s[p + "embeddings.class_embedding"].expand(x.shape[0], 1, d)
    h = torch.cat([cls, patches], dim=1) + s[p + "embeddings.position_embedding.weight"]
    h = F.layer_norm(h, (d,), s[p + "pre_layrnorm.weight"], s[p + "pre_layrnorm.bias"], v.layer_norm_eps)
    for i in range(v.num_hidden_layers):
        q = f"{p}encoder.layers.{i}."
        mod = F.linear(F.silu(c), s[q + "adaLN_modulation.1.weight"], s[q + "adaLN_modulation.1.bias"])
        sh1, sc1, g1, sh2, sc2, g2 = [m[:, None] for m in mod.chunk(6, dim=1)]
        y = F.layer_norm(h, (d,), s[q + "layer_norm1.weight"], s[q + "layer_norm1.bias"], v.layer_norm_eps) * (1 + sc1) + sh1
        qs, ks, vs = (F.linear(y, s[q + f"self_attn.{n}_proj.weight"], s[q + f"self_attn.{n}_proj.bias"])
                      .view(y.shape[0], -1, heads, d // heads).transpose(1, 2) for n in ("q", "k", "v"))
        attn = torch.softmax(qs @ ks.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ vs
        attn = F.linear(attn.transpose(1, 2).reshape(y.shape), s[q + "self_attn.out_proj.weight"], s[q + "self_attn.out_proj.bias"])
        h = h + g1 * attn
        y = F.layer_norm(h, (d,), s[q + "layer_norm2.weight"], s[q + "layer_norm2.bias"], v.layer_norm_eps) * (1 + sc2) + sh2
        y = F.linear(y, s[q + "mlp.fc1.weight"], s[q + "mlp.fc1.bias"])
        y = y * torch.sigmoid(1.702 * y)  # quick_gelu
        h = h + g2 * F.linear(y, s[q + "mlp.fc2.weight"], s[q + "mlp.fc2.bias"])
    pooled = F.layer_norm(h[:, 0], (d,), s[p + "post_layernorm.weight"], s[p + "post_layernorm.bias"], v.layer_norm_eps)
    shift, scale = F.linear(F.silu(c), s[p + "adaLN_modulation.1.weight"], s[p + "adaLN_modulation.1.bias"]).chunk(2, dim=1)
    image = F.linear(pooled * (1 + scale) + shift, s["visual_projection.weight"])
    # the text tower is plain CLIP
    clip = CLIPModel(config)
    clip.load_state_dict({k: w for k, w in s.items() if "adaLN" not in k and "t_embedder" not in k}, strict=False)
    text = clip.eval().get_text_features(input_ids=input_ids)
    text = text if isinstance(text, torch.Tensor) else text.pooler_output
    cosine = (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)).sum(-1)
    return s["logit_scale"].exp() * cosine


def test_spm_loads_the_original_layout_and_scores_as_the_original(spm_folder):
    from transformers import AutoTokenizer, CLIPConfig

    reward = load_reward("spm", path=str(spm_folder))
    assert not reward.training and not any(p.requires_grad for p in reward.parameters())
    images = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(3))
    prompts = ["a photo of a cat", "two red squares"]
    t = torch.tensor([501, 951])
    tokens = AutoTokenizer.from_pretrained(str(spm_folder))(prompts, padding="max_length", max_length=77,
                                                           truncation=True, return_tensors="pt").input_ids
    state = torch.load(next(spm_folder.glob("*.bin")), weights_only=True)
    expected = reference_score(state, CLIPConfig.from_pretrained(str(spm_folder)), images, tokens, t)
    got = reward.score(images, prompts, t=t)
    assert got.dtype == torch.float32 and got.shape == (2,)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # t changes the score (and an int t is every image's)
    assert not torch.allclose(reward.score(images, prompts, t=0), got, atol=1e-3)
    torch.testing.assert_close(reward.score(images, prompts, t=501)[0], got[0])
    # differentiable in the images
    leaf = images.clone().requires_grad_(True)
    reward.score(leaf, prompts, t=t).sum().backward()
    assert leaf.grad.abs().sum() > 0


@pytest.mark.parametrize("change", ["missing", "unexpected", "shape"])
def test_spm_loading_is_strict(spm_folder, tmp_path, change):
    import shutil

    folder = tmp_path / "bad"
    shutil.copytree(spm_folder, folder)
    weights = next(folder.glob("*.bin"))
    state = torch.load(weights, weights_only=True)
    if change == "missing":
        del state["model.t_embedder.mlp.2.bias"]
    elif change == "unexpected":
        state["model.vision_model.extra.weight"] = torch.zeros(1)
    else:
        state["model.vision_model.adaLN_modulation.1.bias"] = torch.zeros(3)
    torch.save(state, weights)
    with pytest.raises(DiffalignError, match=change if change != "shape" else "wrong shape"):
        load_reward("spm", path=str(folder))


def test_spm_without_weights_says_where_to_get_them():
    with pytest.raises(DiffalignError, match="spm@FILE"):
        load_reward("spm")


# --------------------------------------------------------------------------- a fresh SPM from a CLIP
def test_a_fresh_spm_scores_as_the_clip_it_came_from_at_any_t(hf_clip_folder):
    """The original's init_adaln_paras: gates 1, shifts and scales 0, so SPM(image, prompt, t)
    equals the CLIP's PickScore score for every t."""
    from diffalign.rewards.spm import SPMReward

    spm = SPMReward.from_clip(str(hf_clip_folder))
    clip = load_reward("pickscore", path=str(hf_clip_folder))
    images = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    prompts = ["a photo of a cat", "two red squares", "a dog on the left"]
    expected = clip.score(images, prompts)
    for t in (0, 1, 500, 999, torch.tensor([3, 400, 951])):
        torch.testing.assert_close(spm.score(images, prompts, t=t), expected, atol=1e-4, rtol=1e-4)
    width = spm.spm.model.config.vision_config.hidden_size
    bias = spm.spm.model.vision_model.encoder.layers[0].adaLN_modulation[-1].bias
    assert bias[2 * width: 3 * width].eq(1).all() and bias[5 * width:].eq(1).all() and bias[:2 * width].eq(0).all()
    assert any(p.requires_grad for p in spm.parameters())  # trainable, unlike a loaded reward


def test_t_changes_the_score_once_the_modulation_moves(hf_clip_folder):
    from diffalign.rewards.spm import SPMReward

    spm = SPMReward.from_clip(str(hf_clip_folder))
    with torch.no_grad():
        linear = spm.spm.model.vision_model.encoder.layers[1].adaLN_modulation[-1]
        linear.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    images, prompts = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(2)), ["a cat", "a dog"]
    early, late = spm.score(images, prompts, t=10), spm.score(images, prompts, t=900)
    assert (early - late).abs().min() > 1e-3


def test_saved_state_files_load_back_strictly_in_the_original_layout(hf_clip_folder, tmp_path):
    from safetensors.torch import load_file

    from diffalign.rewards.spm import WEIGHTS_NAME, SPMReward

    spm = SPMReward.from_clip(str(hf_clip_folder), seed=3)
    with torch.no_grad():  # a trained SPM: the modulation is no longer the identity
        for p in spm.spm.model.vision_model.adaLN_modulation.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
    for name, data in spm.state_files().items():
        (tmp_path / name).write_bytes(data)
    state = load_file(str(tmp_path / WEIGHTS_NAME))
    assert {k.split(".")[1] for k in state} == {"text_model", "vision_model", "visual_projection", "text_projection",
                                                 "logit_scale", "t_embedder"} and all(k.startswith("model.") for k in state)
    loaded = load_reward("spm", path=str(tmp_path))
    images, prompts = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(5)), ["a cat", "a dog"]
    t = torch.tensor([100, 800])
    torch.testing.assert_close(loaded.score(images, prompts, t=t), spm.score(images, prompts, t=t).detach())
    from transformers import CLIPConfig

    expected = reference_score({k: v for k, v in state.items()}, CLIPConfig.from_pretrained(str(tmp_path)), images,
                               loaded.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                                                return_tensors="pt").input_ids, t)
    torch.testing.assert_close(loaded.score(images, prompts, t=t), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["missing", "not-clip", "no-weights"])
def test_init_that_is_not_a_clip_is_one_line(tmp_path, kind):
    import json

    from diffalign.rewards.spm import SPMReward

    folder = tmp_path / "init"
    if kind != "missing":
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "unet" if kind == "not-clip" else "clip"}))
    expected = {"missing": "not found", "not-clip": "not a CLIPModel folder", "no-weights": "has no weights"}[kind]
    with pytest.raises(DiffalignError, match=expected):
        SPMReward.from_clip(str(folder))


def test_toy_spm_is_registered_and_loads_the_shipped_asset():
    from diffalign.paths import asset
    from diffalign.rewards import REWARDS

    assert REWARDS["toy-spm"] == "diffalign.rewards.spm:toy_spm"
    if not (asset("toy-spm") / "config.json").is_file():
        pytest.skip("assets/toy-spm is not built")
    reward = load_reward("toy-spm")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    scores = reward.score(images, ["one small red circle on the left on a white background"] * 2, t=torch.tensor([0, 750]))
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    # trained from toy-reward: the same at no t any more (the modulation moved)
    toy_reward = load_reward("toy-reward").score(images, ["a red circle"] * 2)
    assert (reward.score(images, ["a red circle"] * 2, t=950) - toy_reward).abs().max() > 1e-2
