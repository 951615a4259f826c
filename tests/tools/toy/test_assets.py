"""The shipped toy assets load through the public loaders and do what docs/toy.md says."""

import io
import json
import random

import pytest
import torch

from diffalign.captions import perturb_text
from diffalign.paths import asset
from tools.toy.build import LOSER_CAPTIONS
from tools.toy.preference_data import loser_caption
from tools.toy.render import ATTRIBUTES, IMAGE_SIZE, perturb, render, split_prompts

pytestmark = pytest.mark.skipif(not (asset("toy-data") / "prompts_train.txt").is_file(),
                                reason="toy assets not built: python -m tools.toy build")

# What the shipped toy-reward must reach on held-out prompts (docs/toy.md has the full numbers).
MIN_PROMPT_PAIR_ACCURACY = 0.85


def to_tensor(image):
    return torch.from_numpy(__import__("numpy").array(image)).permute(2, 0, 1).float() / 255.0


@pytest.mark.parametrize("name", ["toy-reward", "toy-judge"])
def test_clip_assets_load_with_transformers_and_match_the_reward_registry(name):
    from transformers import CLIPModel, CLIPProcessor

    from diffalign.rewards import load_reward

    model = CLIPModel.from_pretrained(asset(name)).eval()
    processor = CLIPProcessor.from_pretrained(asset(name))
    assert model.dtype == torch.float32
    assert processor.image_processor.crop_size["height"] == IMAGE_SIZE
    scene = split_prompts()[1][0]
    image = render(scene, 123)
    inputs = processor(text=[scene.prompt], images=[image], return_tensors="pt", padding=True)
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.visual_projection(model.vision_model(pixel_values=inputs.pixel_values).pooler_output), dim=-1)
        txt = torch.nn.functional.normalize(model.text_projection(model.text_model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).pooler_output), dim=-1)
    expected = (model.logit_scale.exp() * (img * txt).sum(-1)).item()
    reward = load_reward(name)
    assert reward.score(to_tensor(image)[None], [scene.prompt]).item() == pytest.approx(expected, abs=1e-3)


def test_toy_reward_prefers_the_true_prompt_on_heldout_renders():
    from diffalign.rewards import load_reward

    reward = load_reward("toy-reward")
    rng = random.Random(0)
    heldout = split_prompts()[1][::4]  # 27 held-out prompts, never trained on
    images = torch.stack([to_tensor(render(s, 5_000 + i)) for i, s in enumerate(heldout)])
    true = reward.score(images, [s.prompt for s in heldout])
    correct = []
    for attribute in ATTRIBUTES:
        wrong = reward.score(images, [perturb(s, rng, attribute).prompt for s in heldout])
        correct.append((true > wrong).float())
    accuracy = torch.cat(correct).mean().item()
    assert accuracy >= MIN_PROMPT_PAIR_ACCURACY, accuracy


@pytest.mark.parametrize("name", ["toy-sd", "toy-flow"])
def test_generators_load_with_diffusion_pipeline_and_sample(name):
    from diffusers import DiffusionPipeline

    nulls = {"text_encoder_3": None, "tokenizer_3": None} if name == "toy-flow" else {}
    pipe = DiffusionPipeline.from_pretrained(asset(name), **nulls)
    pipe.set_progress_bar_config(disable=True)
    expected = {"toy-sd": "StableDiffusionPipeline", "toy-flow": "StableDiffusion3Pipeline"}[name]
    assert type(pipe).__name__ == expected
    assert all(p.dtype == torch.float32 for p in pipe.text_encoder.parameters())
    out = pipe(["two small red circles on the left on a gray background"], num_inference_steps=3, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(out).all()


@pytest.mark.parametrize("model", ["toy-sd", "toy-flow"])
def test_preference_data_loads_and_is_ranked(model):
    import pyarrow.parquet as pq
    from PIL import Image

    folder = asset("toy-data") / model
    train = set(asset("toy-data").joinpath("prompts_train.txt").read_text().splitlines())
    heldout = set(asset("toy-data").joinpath("prompts_heldout.txt").read_text().splitlines())
    assert train == {s.prompt for s in split_prompts()[0]} and not train & heldout

    ranked = pq.read_table(folder / "ranked.parquet").to_pylist()
    labels = [[row[f"label_{k}"] for k in range(4)] for row in ranked]
    assert all(l == sorted(l, reverse=True) for l in labels)
    assert {row["caption"] for row in ranked} <= train
    assert Image.open(io.BytesIO(ranked[0]["jpg_3"])).size == (IMAGE_SIZE, IMAGE_SIZE)

    pairs = pq.read_table(folder / "pairs.parquet")
    # Pick-a-Pic v2 columns, then Pick-Double Caption's per-image captions (DCPO)
    assert pairs.column_names == ["caption", "jpg_0", "jpg_1", "label_0", "label_1", "caption_0", "caption_1"]
    rows = pairs.to_pylist()
    first = rows[0]
    assert first["jpg_0"] == ranked[0]["jpg_0"] and first["jpg_1"] == ranked[0]["jpg_3"] and first["label_0"] == 1.0
    # DCPO-p captions: the winner keeps the prompt, the loser's is the prompt perturbed: by the
    # caption rules on toy-sd, reworded (the same words in another order) on toy-flow
    if model == "toy-sd":
        assert all(r["caption_0"] == r["caption"] != r["caption_1"] == perturb_text(r["caption"], "weak", seed=0)
                   for r in rows)
    else:
        assert all(r["caption_0"] == r["caption"] != r["caption_1"] == loser_caption(r["caption"], "paraphrase")
                   and sorted(r["caption_1"].split()) == sorted(r["caption"].split()) for r in rows)
    stats = json.loads((folder / "stats.json").read_text())
    assert stats["num_pairs"] == len(rows) == len(ranked)
    assert stats["loser_captions"] == LOSER_CAPTIONS[model]  # what the builder writes today


def test_the_data_builder_reproduces_the_shipped_first_row_with_the_chosen_loser_captions(tmp_path):
    import pyarrow.parquet as pq

    from tools.toy.preference_data import build_preference_data

    # two prompts, best vs worst of 8 as shipped: about 15 s on the CPU
    stats = build_preference_data(asset("toy-flow"), asset("toy-reward"), asset("toy-judge"), tmp_path,
                                  torch.device("cpu"), num_prompts=2, heldout_prompts=1, candidates=8,
                                  loser_captions="paraphrase", log=lambda *args: None)
    ranked = pq.read_table(tmp_path / "ranked.parquet").to_pylist()
    pairs = pq.read_table(tmp_path / "pairs.parquet").to_pylist()
    assert stats["loser_captions"] == "paraphrase" and stats["num_pairs"] == len(pairs) == len(ranked) == 2
    assert all(r["caption_1"] == loser_caption(r["caption"], "paraphrase") != r["caption"] for r in pairs)
    assert all(p["jpg_0"] == r["jpg_0"] and p["jpg_1"] == r["jpg_3"] for p, r in zip(pairs, ranked))
    # the same prompt, seeds and models as the shipped file: the same toy-reward scores, up to
    # float rounding between thread counts
    shipped = pq.read_table(asset("toy-data") / "toy-flow" / "ranked.parquet").slice(0, 1).to_pylist()[0]
    assert ranked[0]["caption"] == shipped["caption"]
    assert [ranked[0][f"label_{k}"] for k in range(4)] == pytest.approx([shipped[f"label_{k}"] for k in range(4)], abs=0.05)
    with pytest.raises(ValueError, match="unknown loser caption strategy"):
        loser_caption(ranked[0]["caption"], "describe")


def test_diffalign_eval_cli_on_toy_sd(tmp_path):
    from diffalign.cli import main

    out = tmp_path / "eval"
    code = main(["eval", "--model", "toy-sd", "--baseline", "toy-sd", "--prompts", "toy", "--max-prompts", "2",
                 "--reward", "toy-reward", "--num-images", "1", "--num-inference-steps", "2", "--output-dir", str(out), "--device", "cpu"])
    assert code == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["rewards"]["toy-reward"]["win_rate"] == 0.5  # the same model ties with itself
    assert (out / "grid.png").is_file()


@pytest.mark.parametrize("name", ["toy-sd", "toy-flow"])
def test_the_builder_writes_the_shipped_sampling_defaults(name, tmp_path):
    from tools.toy.build import write_sampling_defaults

    write_sampling_defaults(tmp_path)  # the settings the toy data was sampled with
    assert (tmp_path / "diffalign.json").read_bytes() == (asset(name) / "diffalign.json").read_bytes()


def test_the_toy_sd_recipe_builds_the_shipped_architecture(tmp_path):
    from diffalign.rewards.clip_tokenizer import write_clip_tokenizer
    from tools.toy.generators import build_sd_parts

    write_clip_tokenizer(tmp_path)
    shipped = json.loads((asset("toy-sd") / "unet" / "config.json").read_text())
    shipped_tokenizer = json.loads((asset("toy-sd") / "tokenizer" / "tokenizer_config.json").read_text())
    tokenizer, _, unet, _ = build_sd_parts(tmp_path, seed=0)
    for key in ("down_block_types", "up_block_types", "block_out_channels", "attention_head_dim"):
        assert list(unet.config[key]) == shipped[key], key
    assert unet.config.cross_attention_dim == shipped["cross_attention_dim"]
    assert tokenizer.model_max_length == shipped_tokenizer["model_max_length"] == 16
    ids = tokenizer(["three large red squares on the left on a white background"], padding="max_length",
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    assert ids.shape == (1, 16) and ids[0, -1] == tokenizer.pad_token_id  # the longest toy prompts fit

    # the prompt is read at 16x16 (one head) and at 8x8 (eight heads)
    assert list(unet.config.down_block_types) == ["CrossAttnDownBlock2D"] * 2
    assert list(unet.config.up_block_types) == ["CrossAttnUpBlock2D"] * 2
    assert unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 1
    assert unet.up_blocks[1].attentions[0].transformer_blocks[0].attn2.heads == 1
    assert unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.heads == 8
