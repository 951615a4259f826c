"""CLIP score = max(100 * cos, 0), on both backends, against each library's own computation."""

from __future__ import annotations

import pytest
import torch

from diffalign.errors import DiffalignError
from diffalign.rewards import load_reward
from diffalign.rewards.base import pil_to_tensor

from helpers import TINY_OPEN_CLIP, random_pil

PROMPTS = ["a cat", "a red car on a road", "two dogs", "a lighthouse at night", "soup", "a tree"]


def test_transformers_backend_equals_clipmodel(hf_clip_folder):
    from transformers import CLIPModel, CLIPProcessor

    images = [random_pil(224, 224, i) for i in range(len(PROMPTS))]
    model = CLIPModel.from_pretrained(hf_clip_folder).eval()
    inputs = CLIPProcessor.from_pretrained(hf_clip_folder)(text=PROMPTS, images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
        raw = 100 * torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
        ours = load_reward("clip", path=str(hf_clip_folder)).score(images, PROMPTS)
    assert (raw < 0).any() and (raw > 0).any(), "seeded case must cover the clamp"
    torch.testing.assert_close(ours, raw.clamp(min=0), atol=1e-3, rtol=1e-5)


def test_open_clip_backend_equals_open_clip(tmp_path):
    import open_clip

    torch.manual_seed(1)
    model = open_clip.CLIP(**TINY_OPEN_CLIP).eval()
    torch.save(model.state_dict(), tmp_path / "tiny_clip.pt")
    reward = load_reward("clip", path=str(tmp_path / "tiny_clip.pt"), architecture=TINY_OPEN_CLIP)
    # open_clip's own eval transform (on tensors: ToTensor first, so no uint8 rounding).
    preprocess = open_clip.image_transform(224, is_train=False)
    images = [random_pil(300, 240, i) for i in range(len(PROMPTS))]
    with torch.no_grad():
        pixels = torch.stack([preprocess(im) for im in images])
        image_f = model.encode_image(pixels, normalize=True)
        text_f = model.encode_text(open_clip.get_tokenizer("ViT-B-32")(PROMPTS), normalize=True)
        expected = (100 * (image_f * text_f).sum(-1)).clamp(min=0)
        ours = reward.score(images, PROMPTS)
        from_tensors = reward.score(torch.stack([pil_to_tensor(im) for im in images]), PROMPTS)
    # PIL images take open_clip's own transform (PIL resize of the uint8 image): equal.
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-5)
    # Tensors are resized in torch (differentiable): measured 0.05 on scores of 2-34.
    assert (from_tensors - expected).abs().max() < 0.2
    assert reward.backend == "open_clip"


def test_transformers_backend_pil_path_is_the_pil_processor(hf_clip_folder):
    """Non-square images: the PIL path is the PIL image processor, not a torch re-implementation."""
    from transformers import CLIPModel, CLIPTokenizer
    from transformers.models.clip import CLIPImageProcessorPil

    images = [random_pil(300 - 17 * i, 230 + 11 * i, i) for i in range(len(PROMPTS))]
    model = CLIPModel.from_pretrained(hf_clip_folder).eval()
    pixels = CLIPImageProcessorPil.from_pretrained(hf_clip_folder)(images=images, return_tensors="pt")["pixel_values"]
    tokens = CLIPTokenizer.from_pretrained(hf_clip_folder)(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**tokens, pixel_values=pixels)
        expected = (100 * torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)).clamp(min=0)
        ours = load_reward("clip", path=str(hf_clip_folder)).score(images, PROMPTS)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-5)


def test_gradient_flows_where_the_score_is_positive(hf_clip_folder):
    reward = load_reward("clip", path=str(hf_clip_folder))
    images = torch.rand(len(PROMPTS), 3, 64, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    scores = reward.score(images, PROMPTS)
    scores.sum().backward()
    positive = scores > 0
    assert positive.any()
    grad_norms = images.grad.flatten(1).norm(dim=1)
    assert (grad_norms[positive] > 0).all() and (grad_norms[~positive] == 0).all()


def test_open_clip_backend_needs_a_path():
    with pytest.raises(DiffalignError, match="needs weights"):
        load_reward("clip", architecture="ViT-B-32")
