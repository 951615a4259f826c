"""ImageReward port: a random checkpoint with the original key names (written here from the
original BLIP/ImageReward code, not from diffalign's modules) loads strictly through the public
loader, and the score equals an independent forward: timm's ViT for the image tower and plain
torch ops for the BLIP med BERT cross-encoder and the MLP head."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from diffalign.errors import DiffalignError
from diffalign.rewards.imagereward import MEAN, STD, ImageRewardReward

VIT = {"image_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4}
MED = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 24, "initializer_range": 0.02, "intermediate_size": 48,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 4,
    "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 50,
    "encoder_width": 24, "add_cross_attention": True,
}
WORDS = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz",
         "cat", "dog", "photo", "of", "on", "the", "##s", "red", "a"]
PROMPTS = ["a photo of a red cat", "dogs on the mat and a very long tail of letters x y z q r s t u v w x y z a b c d e f g h i j k l"]


def original_key_shapes(vit: dict, med: dict) -> dict[str, tuple]:
    """Keys and shapes of ImageReward.state_dict() as the original code builds it."""
    d, h, i, p = vit["embed_dim"], med["hidden_size"], med["intermediate_size"], vit["patch_size"]
    n = (vit["image_size"] // p) ** 2 + 1
    shapes = {"blip.visual_encoder.cls_token": (1, 1, d), "blip.visual_encoder.pos_embed": (1, n, d),
              "blip.visual_encoder.patch_embed.proj.weight": (d, 3, p, p), "blip.visual_encoder.patch_embed.proj.bias": (d,),
              "blip.visual_encoder.norm.weight": (d,), "blip.visual_encoder.norm.bias": (d,)}
    for b in range(vit["depth"]):
        pre = f"blip.visual_encoder.blocks.{b}."
        for name, shape in [("norm1", (d,)), ("norm2", (d,)), ("attn.qkv", (3 * d, d)), ("attn.proj", (d, d)),
                            ("mlp.fc1", (4 * d, d)), ("mlp.fc2", (d, 4 * d))]:
            shapes[pre + name + ".weight"] = shape
            shapes[pre + name + ".bias"] = (shape[0],)
    te = "blip.text_encoder."
    shapes.update({te + "embeddings.word_embeddings.weight": (med["vocab_size"], h),
                   te + "embeddings.position_embeddings.weight": (med["max_position_embeddings"], h),
                   te + "embeddings.LayerNorm.weight": (h,), te + "embeddings.LayerNorm.bias": (h,)})
    for layer in range(med["num_hidden_layers"]):
        pre = f"{te}encoder.layer.{layer}."
        linears = [("attention.self.query", (h, h)), ("attention.self.key", (h, h)), ("attention.self.value", (h, h)),
                   ("attention.output.dense", (h, h)), ("crossattention.self.query", (h, h)),
                   ("crossattention.self.key", (h, d)), ("crossattention.self.value", (h, d)),
                   ("crossattention.output.dense", (h, h)), ("intermediate.dense", (i, h)), ("output.dense", (h, i)),
                   ("attention.output.LayerNorm", (h,)), ("crossattention.output.LayerNorm", (h,)), ("output.LayerNorm", (h,))]
        for name, shape in linears:
            shapes[pre + name + ".weight"] = shape
            shapes[pre + name + ".bias"] = (shape[0],)
    for name, shape in [("blip.vision_proj", (256, d)), ("blip.text_proj", (256, h)), ("mlp.layers.0", (1024, h)),
                        ("mlp.layers.2", (128, 1024)), ("mlp.layers.4", (64, 128)), ("mlp.layers.6", (16, 64)), ("mlp.layers.7", (1, 16))]:
        shapes[name + ".weight"] = shape
        shapes[name + ".bias"] = (shape[0],)
    return shapes


def random_checkpoint(vit: dict, med: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in original_key_shapes(vit, med).items():
        scale = 1.0 / math.sqrt(shape[-1]) if len(shape) >= 2 else 0.1
        value = torch.randn(shape, generator=g) * scale
        if "norm" in key.lower() and key.endswith("weight"):
            value = 1.0 + value
        state[key] = value
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(med["max_position_embeddings"])[None]
    return state


def write_release(folder, state, med=MED, weights_file="ImageReward.pt"):
    """The THUDM/ImageReward layout: ImageReward.pt (flat state dict) + med_config.json, plus a
    stand-in bert-base-uncased vocab in tokenizer/."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / weights_file)
    (folder / "med_config.json").write_text(json.dumps(med))
    (folder / "tokenizer").mkdir(exist_ok=True)
    (folder / "tokenizer" / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return folder


# ---------------------------------------------------------------------- independent forward


def reference_tokens(folder, prompts):
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(folder / "tokenizer"))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")


def reference_preprocess(images, size):
    from torchvision.transforms import v2

    t = v2.Compose([v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(size),
                    v2.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    return t(images)


def reference_vit(state, vit, pixels):
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=vit["image_size"], patch_size=vit["patch_size"], embed_dim=vit["embed_dim"],
                              depth=vit["depth"], num_heads=vit["num_heads"], num_classes=0, global_pool="", qkv_bias=True)
    prefix = "blip.visual_encoder."
    model.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    return model.eval().forward_features(pixels)


def linear(state, name, x):
    return x @ state[name + ".weight"].T + state[name + ".bias"]


def layer_norm(state, name, x, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * state[name + ".weight"] + state[name + ".bias"]


def attention(state, pre, x, ctx, heads, mask):
    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, -1).permute(0, 2, 1, 3)

    q, k, v = (split(linear(state, pre + "self." + n, src)) for n, src in (("query", x), ("key", ctx), ("value", ctx)))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask
    out = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(x.shape)
    return layer_norm(state, pre + "output.LayerNorm", linear(state, pre + "output.dense", out) + x, MED["layer_norm_eps"])


def reference_score(state, vit, med, images, tokens, pixels=None):
    """`images` in [0, 1], or already preprocessed `pixels` (e.g. by the original PIL transform)."""
    eps, heads = med["layer_norm_eps"], med["num_attention_heads"]
    pixels = reference_preprocess(images, vit["image_size"]) if pixels is None else pixels
    image_embeds = reference_vit(state, vit, pixels)
    te = "blip.text_encoder."
    ids, mask = tokens.input_ids, tokens.attention_mask
    x = state[te + "embeddings.word_embeddings.weight"][ids] + state[te + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    x = layer_norm(state, te + "embeddings.LayerNorm", x, eps)
    text_mask = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for layer in range(med["num_hidden_layers"]):
        pre = f"{te}encoder.layer.{layer}."
        x = attention(state, pre + "attention.", x, x, heads, text_mask)
        x = attention(state, pre + "crossattention.", x, image_embeds, heads, None)
        ff = linear(state, pre + "output.dense", F.gelu(linear(state, pre + "intermediate.dense", x)))
        x = layer_norm(state, pre + "output.LayerNorm", ff + x, eps)
    r = x[:, 0]
    for idx in (0, 2, 4, 6, 7):  # no activations between the linears
        r = linear(state, f"mlp.layers.{idx}", r)
    return ((r - MEAN) / STD).squeeze(-1)


# ---------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    state = random_checkpoint(VIT, MED)
    return write_release(tmp_path_factory.mktemp("imagereward"), state), state


@pytest.fixture(scope="module")
def reward(release):
    return ImageRewardReward.from_pretrained(release[0], vit=VIT)


def test_score_matches_independent_forward(reward, release):
    folder, state = release
    images = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    got = reward.score(images, PROMPTS)
    want = reference_score(state, VIT, MED, images, reference_tokens(folder, PROMPTS))
    assert got.dtype == torch.float32 and got.shape == (2,)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert not reward.training and not any(p.requires_grad for p in reward.parameters())


def test_text_is_truncated_to_35_tokens(reward, release):
    tokens = reference_tokens(release[0], PROMPTS)
    assert tokens.input_ids.shape[1] == 35 and tokens.attention_mask[1].sum() == 35  # the long prompt is cut


def test_gradient_reaches_images_and_batch_equals_single(reward):
    images = torch.rand(3, 3, 32, 36, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    prompts = ["a cat", "red dogs", "the photo"]
    scores = reward.score(images, prompts)
    scores.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    singles = torch.cat([reward.score(images[i : i + 1].detach(), prompts[i]) for i in range(3)])
    torch.testing.assert_close(scores.detach(), singles, atol=1e-5, rtol=1e-5)


def original_transform(n_px):
    """ImageReward's `_transform(n_px)` (ImageReward/ImageReward.py), rebuilt from torchvision in
    its order: Resize and CenterCrop on the PIL image in its own mode, then RGB, ToTensor, Normalize."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(n_px, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(n_px),
                      lambda image: image.convert("RGB"), T.ToTensor(),
                      T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])


@pytest.mark.filterwarnings("ignore:Palette images")  # PIL, converting the palette test image
def test_pil_images_and_files_score_as_the_original(reward, release, tmp_path):
    """PIL path = the original `score(prompt, image)`: Image.open, `_transform`, the model."""
    from PIL import Image

    folder, state = release
    g = torch.Generator().manual_seed(11)
    smooth = F.interpolate(torch.rand(1, 4, 5, 6, generator=g), size=(61, 77), mode="bicubic")[0].clamp(0, 1)
    rgba = Image.fromarray((smooth.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy(), mode="RGBA")
    noise = Image.fromarray((torch.rand(37, 53, 3, generator=g) * 255).to(torch.uint8).numpy())
    images = [rgba.convert("RGB"), noise, rgba, rgba.convert("P"), rgba.convert("L")]  # modes the original resizes in
    files = []
    for i, image in enumerate(images):
        files.append(tmp_path / f"{i}.png")
        image.save(files[-1])
    prompts = ["a red cat", "dogs", "the photo", "a cat on the mat", "red"]
    pixels = torch.stack([original_transform(32)(Image.open(f)) for f in files])
    want = reference_score(state, VIT, MED, None, reference_tokens(folder, prompts), pixels=pixels)
    torch.testing.assert_close(reward.score([str(f) for f in files], prompts), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(reward.score(images, prompts), want, atol=1e-5, rtol=0)


def test_exact_tensor_input_equals_its_file(reward, tmp_path):
    """A tensor on the uint8 grid scores as its PNG file with exact=True; the default tensor path
    (differentiable) stays within the stated bound of it (see the next test)."""
    from PIL import Image

    array = (torch.rand(40, 48, 3, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8)
    Image.fromarray(array.numpy()).save(tmp_path / "x.png")
    tensor = array.permute(2, 0, 1)[None].float() / 255
    from_file = reward.score([str(tmp_path / "x.png")], "a cat")
    torch.testing.assert_close(reward.score(tensor, "a cat", exact=True), from_file, atol=1e-5, rtol=0)
    assert (reward.score(tensor, "a cat") - from_file).abs().max() < 0.02


def test_registry_builds_it(reward, release):
    from diffalign.rewards import load_reward

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    loaded = load_reward("imagereward", path=str(release[0]), vit=VIT)
    torch.testing.assert_close(loaded.score(images, PROMPTS), reward.score(images, PROMPTS))


def test_bad_input(reward):
    with pytest.raises(DiffalignError, match="prompts"):
        reward.score(torch.rand(2, 3, 32, 32), ["one"])
    with pytest.raises(DiffalignError, match="shape"):
        reward.score(torch.rand(3, 32, 32), "a cat")
    with pytest.raises(DiffalignError, match=r"\[0, 1\]"):
        reward.score(torch.rand(1, 3, 32, 32) * 2 - 1, "a cat")


def test_strict_loading_and_missing_files(release, tmp_path):
    folder, state = release
    broken = dict(state)
    broken.pop("mlp.layers.7.bias")
    broken["blip.extra.weight"] = torch.zeros(1)
    write_release(tmp_path / "broken", broken)
    with pytest.raises(DiffalignError, match=r"missing: mlp\.layers\.7\.bias.*unexpected: blip\.extra\.weight"):
        ImageRewardReward.from_pretrained(tmp_path / "broken", vit=VIT)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffalignError, match="ImageReward.pt"):
        ImageRewardReward.from_pretrained(tmp_path / "empty", vit=VIT)
    with pytest.raises(DiffalignError, match="vocab.txt"):
        ImageRewardReward.from_pretrained(folder, vit=VIT, tokenizer=tmp_path / "no-tokenizer")
    # The checkpoint file itself also works (med_config.json and tokenizer/ beside it).
    direct = ImageRewardReward.from_pretrained(folder / "ImageReward.pt", vit=VIT)
    assert torch.isfinite(direct.score(torch.rand(1, 3, 32, 32), "a dog")).all()
