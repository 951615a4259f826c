"""HPSv2 fidelity: random weights in the released file layout, scored against the original
formula computed independently (open_clip's own model + torchvision's transforms, as in
hpsv2's preprocess_val)."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from diffalign.errors import DiffalignError
from diffalign.rewards import load_reward
from diffalign.rewards.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, pil_to_tensor

from helpers import TINY_OPEN_CLIP, random_pil

PROMPTS = ["a red bicycle leaning on a wall", "an astronaut riding a horse"]


@pytest.fixture(scope="module")
def hps(hps_checkpoint):
    return load_reward("hpsv2.1", path=str(hps_checkpoint), architecture=TINY_OPEN_CLIP)


def original_preprocess(pil_image):
    """hpsv2 preprocess_val: ToTensor -> ResizeMaxSize(224, fill=0) on the tensor -> Normalize."""
    x = TF.to_tensor(pil_image.convert("RGB"))
    h, w = x.shape[1:]
    scale = 224 / float(max(h, w))
    new_size = tuple(round(d * scale) for d in (h, w))
    x = TF.resize(x, list(new_size), InterpolationMode.BICUBIC)
    pad_h, pad_w = 224 - new_size[0], 224 - new_size[1]
    x = TF.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return TF.normalize(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def original_scores(checkpoint_file, pil_images, prompts):
    """hpsv2/img_score.py: model(image, text) -> diag(image_features @ text_features.T)."""
    import open_clip

    model = open_clip.CLIP(**TINY_OPEN_CLIP, output_dict=True)
    model.load_state_dict(torch.load(checkpoint_file, weights_only=True)["state_dict"])
    model.eval()
    tokenizer = open_clip.get_tokenizer("ViT-H-14")
    with torch.no_grad():
        out = model(torch.stack([original_preprocess(p) for p in pil_images]), tokenizer(prompts))
    return torch.diagonal(out["image_features"] @ out["text_features"].T)


def test_score_equals_original_formula(hps, hps_checkpoint):
    images = [random_pil(300, 200, 0), random_pil(160, 256, 1)]  # landscape and portrait: padding on both axes
    expected = original_scores(hps_checkpoint / "HPS_v2.1_compressed.pt", images, PROMPTS)
    with torch.no_grad():
        ours = hps.score(images, PROMPTS)
    assert ours.dtype == torch.float32 and ours.shape == (2,)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_tensor_input_matches_pil_path(hps, tmp_path):
    # ToTensor of a PIL image is exactly the [0, 1] tensor a pipeline would hand over: hpsv2
    # resizes that float tensor too, so both paths (and exact=True) are the original's.
    pil = random_pil(320, 240, 2)
    pil.save(tmp_path / "x.png")
    with torch.no_grad():
        from_pil = hps.score([pil], PROMPTS[:1])
        from_file = hps.score([str(tmp_path / "x.png")], PROMPTS[:1])
        from_tensor = hps.score(pil_to_tensor(pil)[None], PROMPTS[:1])
        exact = hps.score(pil_to_tensor(pil)[None], PROMPTS[:1], exact=True)
    torch.testing.assert_close(from_tensor, from_pil, atol=1e-6, rtol=0)
    torch.testing.assert_close(from_file, from_pil, atol=0, rtol=0)
    torch.testing.assert_close(exact, from_pil, atol=1e-6, rtol=0)


def test_benchmark_scale_and_v2_file(hps, hps_checkpoint):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    scaled = load_reward("hpsv2.1", path=str(hps_checkpoint), architecture=TINY_OPEN_CLIP, scale=100)
    v2 = load_reward("hpsv2", path=str(hps_checkpoint / "HPS_v2_compressed.pt"), architecture=TINY_OPEN_CLIP)
    with torch.no_grad():
        base = hps.score(images, PROMPTS)
        torch.testing.assert_close(scaled.score(images, PROMPTS), 100 * base)
        torch.testing.assert_close(v2.score(images, PROMPTS), base)  # same random weights in both files
    assert (v2.name, hps.name) == ("hpsv2", "hpsv2.1")


def test_batch_equals_one_by_one_and_gradient(hps):
    images = torch.rand(3, 3, 96, 128, generator=torch.Generator().manual_seed(1), requires_grad=True)
    prompts = PROMPTS + ["a bowl of fruit"]
    batch = hps.score(images, prompts)
    single = torch.cat([hps.score(images[i : i + 1], prompts[i]) for i in range(3)])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-5)
    batch.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in hps.parameters()) and not hps.training


def test_missing_mismatched_and_offline_checkpoint(tmp_path, hps_checkpoint, monkeypatch):
    with pytest.raises(DiffalignError, match="HPS_v2.1_compressed.pt not found in"):
        load_reward("hpsv2.1", path=str(tmp_path))
    deeper = {**TINY_OPEN_CLIP, "text_cfg": {**TINY_OPEN_CLIP["text_cfg"], "layers": 3}}
    with pytest.raises(DiffalignError, match=r"missing: transformer\.resblocks\.2\."):
        load_reward("hpsv2.1", path=str(hps_checkpoint), architecture=deeper)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DiffalignError, match="HPS_v2_compressed.pt from hub repo 'xswu/HPSv2'.*--reward hpsv2@DIR"):
        load_reward("hpsv2")


# Key names and shapes from the released HPS_v2.1_compressed.pt (see docs/rewards.md).
RELEASED_SHAPES = {
    "visual.conv1.weight": (1280, 3, 14, 14),
    "visual.class_embedding": (1280,),
    "visual.positional_embedding": (257, 1280),
    "visual.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
    "visual.transformer.resblocks.31.mlp.c_fc.weight": (5120, 1280),
    "visual.proj": (1280, 1024),
    "token_embedding.weight": (49408, 1024),
    "positional_embedding": (77, 1024),
    "transformer.resblocks.23.mlp.c_fc.weight": (4096, 1024),
    "text_projection": (1024, 1024),
    "logit_scale": (),
}


@pytest.mark.slow
def test_real_vit_h_14_has_the_released_key_layout():
    from diffalign.rewards.clip import build_open_clip

    model, _ = build_open_clip("ViT-H-14")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, shape in RELEASED_SHAPES.items():
        assert shapes[key] == shape, key
    assert "visual.conv1.bias" not in shapes and "attn_mask" not in shapes
    assert sum(k.startswith("visual.transformer.resblocks.") and k.endswith("ln_1.weight") for k in shapes) == 32
    assert sum(k.startswith("transformer.resblocks.") and k.endswith("ln_1.weight") for k in shapes) == 24
