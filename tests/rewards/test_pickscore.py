"""PickScore fidelity: a random CLIPModel saved like yuvalkirstain/PickScore_v1, scored against
transformers' own CLIPModel + CLIPProcessor on PIL images (the original README code)."""

from __future__ import annotations

import pytest
import torch

from diffalign.errors import DiffalignError
from diffalign.rewards import load_reward
from diffalign.rewards.base import clip_crop_transform, pil_to_tensor

from helpers import random_pil, tiny_hf_clip_config

PROMPTS = ["a red bicycle leaning on a wall", "an astronaut riding a horse on the moon at dusk"]


@pytest.fixture(scope="module")
def pickscore(hf_clip_folder):
    return load_reward("pickscore", path=str(hf_clip_folder))


def original_scores(folder, pil_images, prompts):
    """PickScore README: processor(images), processor(text, padding, truncation, max_length=77),
    normalised embeddings, logit_scale.exp() * text_embs @ image_embs.T (the diagonal here).
    The image processor is the PIL one, as in transformers 4.x that the original used."""
    from transformers import CLIPModel, CLIPTokenizer
    from transformers.models.clip import CLIPImageProcessorPil

    model = CLIPModel.from_pretrained(folder).eval()
    image_inputs = CLIPImageProcessorPil.from_pretrained(folder)(images=pil_images, return_tensors="pt")
    text_inputs = CLIPTokenizer.from_pretrained(folder)(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(**text_inputs, pixel_values=image_inputs["pixel_values"])
    return torch.diagonal(out.logits_per_image)


def test_score_equals_original_formula(pickscore, hf_clip_folder):
    # 224x224: the processor's resize and crop are identities, so only the formula is compared.
    images = [random_pil(224, 224, 0), random_pil(224, 224, 1)]
    with torch.no_grad():
        ours = pickscore.score(images, PROMPTS)
    assert ours.dtype == torch.float32 and ours.shape == (2,)
    torch.testing.assert_close(ours, original_scores(hf_clip_folder, images, PROMPTS), atol=1e-4, rtol=1e-5)


def test_pil_images_and_files_score_as_the_original(pickscore, hf_clip_folder, tmp_path):
    """Any size and mode: the PIL path is the processor's own (PIL bicubic on uint8, crop
    offsets floored, alpha composited on white), so scores equal the original's to 1e-5."""
    from PIL import Image

    rgba = random_pil(203, 301, 4).convert("RGBA")
    rgba.putalpha(random_pil(203, 301, 5).convert("L"))
    images = [random_pil(320, 241, 2), random_pil(203, 300, 3), rgba, random_pil(97, 60, 6).convert("L")]
    prompts = PROMPTS + ["a bowl", "two dogs on a red sofa"]
    files = []
    for i, image in enumerate(images):
        files.append(tmp_path / f"{i}.png")
        image.save(files[-1])
    want = original_scores(hf_clip_folder, [Image.open(f) for f in files], prompts)
    with torch.no_grad():
        torch.testing.assert_close(pickscore.score([str(f) for f in files], prompts), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(pickscore.score(images, prompts), want, atol=1e-5, rtol=0)
        # a tensor on the uint8 grid with exact=True is its RGB file
        tensor = pil_to_tensor(images[0])[None]
        torch.testing.assert_close(pickscore.score(tensor, PROMPTS[:1], exact=True), want[:1], atol=1e-5, rtol=0)


def test_tensor_preprocessing_matches_the_pil_processor(pickscore, hf_clip_folder):
    """Stated tolerance: the processor resizes uint8 pixels and rounds, ours stays float, so
    pixels differ by at most 2/255 (mean < 0.5/255) and scores by < 1% of the logit scale."""
    from transformers.models.clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil.from_pretrained(hf_clip_folder)
    transform = clip_crop_transform(224)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    images = [random_pil(320, 240, 2), random_pil(200, 300, 3)]
    for pil in images:
        ours = transform(pil_to_tensor(pil)[None])[0]
        theirs = processor(images=pil, return_tensors="pt")["pixel_values"][0]
        diff = (ours - theirs).abs() * std  # back to [0, 1] pixel units
        assert diff.max() <= 2 / 255 and diff.mean() < 0.5 / 255
    with torch.no_grad():
        ours = pickscore.score(images, PROMPTS)
    scale = pickscore.model.logit_scale.exp()
    assert (ours - original_scores(hf_clip_folder, images, PROMPTS)).abs().max() < 0.01 * scale


def test_batch_equals_one_by_one_and_gradient(pickscore):
    images = torch.rand(3, 3, 200, 256, generator=torch.Generator().manual_seed(0), requires_grad=True)
    prompts = PROMPTS + ["a bowl"]  # different lengths: padding must not change a score
    batch = pickscore.score(images, prompts)
    single = torch.cat([pickscore.score(images[i : i + 1], [prompts[i]]) for i in range(3)])
    torch.testing.assert_close(batch, single, atol=1e-4, rtol=1e-5)
    batch.sum().backward()
    assert images.grad.abs().sum() > 0
    assert not pickscore.training and all(not p.requires_grad for p in pickscore.parameters())


def test_strict_loading_and_missing_weights(tmp_path, hf_clip_folder, monkeypatch):
    from safetensors.torch import load_file, save_file
    from transformers import CLIPModel

    # An extra key (e.g. weights of another model) is reported, not silently ignored.
    CLIPModel(tiny_hf_clip_config()).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["extra_head.weight"] = torch.zeros(2, 2)
    del weights["visual_projection.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DiffalignError, match="missing: visual_projection.weight; unexpected: extra_head.weight"):
        load_reward("pickscore", path=str(tmp_path), processor=str(hf_clip_folder))
    with pytest.raises(DiffalignError, match="not found"):
        load_reward("pickscore", path=str(tmp_path / "nowhere"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DiffalignError, match="yuvalkirstain/PickScore_v1.*--reward pickscore@DIR"):
        load_reward("pickscore")


@pytest.mark.slow
def test_real_clip_h_layout():
    """PickScore_v1 is CLIP-H in transformers' CLIPModel layout."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
    vision = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14)
    shapes = {k: tuple(v.shape) for k, v in CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=1024)).state_dict().items()}
    assert shapes["vision_model.embeddings.patch_embedding.weight"] == (1280, 3, 14, 14)
    assert shapes["vision_model.embeddings.position_embedding.weight"] == (257, 1280)
    assert shapes["visual_projection.weight"] == (1024, 1280) and shapes["text_projection.weight"] == (1024, 1024)
    assert "vision_model.pre_layrnorm.weight" in shapes and "vision_model.encoder.layers.31.mlp.fc1.weight" in shapes
