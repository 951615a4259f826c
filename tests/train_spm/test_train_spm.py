"""`diffalign train-spm`: PickScore's soft-label loss with ties kept, the first step's loss
against an independent computation (diffusers' own DDIM x0, VAE and the CLIP the SPM starts
as), the saved folder loading back as `spm@OUT`, and one-line errors for bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffalign.cli import main
from diffalign.train_spm import SPMConfig, build_pairs, pair_correct, pair_labels, soft_label_loss, train_spm


def test_soft_label_loss_by_hand_and_ties_contribute():
    scores = torch.tensor([[2.0, 1.0], [0.3, 0.3], [0.0, 1.5]], requires_grad=True)
    labels = pair_labels(torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.5, 0.5]]))
    assert labels.tolist() == [[1.0, 0.0], [0.5, 0.5], [0.5, 0.5]]
    loss = soft_label_loss(scores, labels)
    p = 1 / (1 + math.exp(-1.5))  # softmax of the third pair
    expected = [-math.log(1 / (1 + math.exp(-1.0))), 0.0, -0.5 * math.log(1 - p) - 0.5 * math.log(p) + math.log(0.5)]
    torch.testing.assert_close(loss, torch.tensor(expected))
    loss.sum().backward()
    assert scores.grad[2, 0] < 0 < scores.grad[2, 1]  # a tie pulls unequal scores together
    assert scores.grad[1].abs().sum() == 0  # and is at its optimum when they are equal
    assert pair_correct(scores.detach(), labels).tolist() == [1.0, 0.0, 0.5]


def test_ties_are_kept_as_pairs(pairs_parquet):
    pairs = build_pairs(SPMConfig(base_model="", dataset=pairs_parquet, init="", output_dir="", resolution=32))
    assert len(pairs) == 9  # the diffalign train reader drops the tie; train-spm keeps it
    ties = [i for i in range(len(pairs)) if pairs.load(i)["scores"].tolist() == [0.5, 0.5]]
    assert len(ties) == 1


def independent_first_loss(model_dir: str, clip_dir: str, data: str, batch_size: int, guidance: float) -> float:
    """Step 1 by hand: the step's batch and draws, diffusers' DDIM pred_original_sample, the
    VAE, and the CLIP's PickScore score (a fresh SPM is its CLIP at every t)."""
    from diffusers import DiffusionPipeline

    from diffalign.rewards import load_reward
    from diffalign.train import GroupOrder

    pairs = build_pairs(SPMConfig(base_model="", dataset=data, init="", output_dir="", resolution=32))
    pairs.set_epoch(0)
    items = [pairs[i] for i in GroupOrder(len(pairs), 0, 0, 0, 1, batch_size).indices()[:batch_size]]
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    vae, unet, scheduler = pipe.vae, pipe.unet, pipe.scheduler
    scheduler.set_timesteps(1000)
    gen = torch.Generator().manual_seed(0)  # micro-step 0 of seed 0
    shape = (unet.config.in_channels, 32 // pipe.vae_scale_factor, 32 // pipe.vae_scale_factor)
    noise = torch.randn((batch_size, 1, *shape), generator=gen)[:, 0]
    t = torch.randint(0, 1000, (batch_size,), generator=gen)
    scores = []
    with torch.no_grad():
        for item, n, ti in zip(items, noise, t):
            prompt = item["prompt"]
            cond, uncond = pipe.encode_prompt([prompt], "cpu", 1, True, negative_prompt=[""])
            pair = []
            for pixels in item["pixels"]:
                x0 = vae.encode(pixels[None]).latent_dist.mode() * vae.config.scaling_factor
                xt = scheduler.add_noise(x0, n[None], ti[None])
                eps_u, eps_c = unet(torch.cat([xt, xt]), ti, torch.cat([uncond, cond])).sample.chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
                pred = scheduler.step(eps, int(ti), xt).pred_original_sample
                pair.append((vae.decode(pred / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1))
            scores.append(load_reward("pickscore", path=clip_dir).score(torch.cat(pair), [prompt, prompt]))
    scores = torch.stack(scores)
    labels = pair_labels(torch.stack([item["scores"] for item in items]))
    return soft_label_loss(scores, labels).mean().item()


def test_two_steps_train_and_the_folder_loads_back_as_spm(tiny_sd_dir, hf_clip_folder, pairs_parquet, tmp_path):
    from diffalign.edges import load_rewards

    out = tmp_path / "spm"
    cfg = SPMConfig(base_model=tiny_sd_dir, dataset=pairs_parquet, init=str(hf_clip_folder), output_dir=str(out),
                    batch_size=3, max_steps=2, lr=1e-3, resolution=32, guidance_scale=3.0, log_every=1, seed=0)
    result = train_spm(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and result["pairs"] == 9
    expected = independent_first_loss(tiny_sd_dir, str(hf_clip_folder), pairs_parquet, 3, 3.0)
    assert rows[0]["loss"] == pytest.approx(expected, abs=1e-4)
    reward = next(iter(load_rewards(f"spm@{out}").values()))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    scores = reward.score(images, ["a red square", "a tie"], t=torch.tensor([0, 900]))
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    # trained: the modulation moved off the identity, so t now changes the score
    assert not torch.allclose(reward.score(images, ["a", "b"], t=0), reward.score(images, ["a", "b"], t=900))


def test_the_cli_runs_it(tiny_sd_dir, hf_clip_folder, pairs_parquet, tmp_path):
    out = tmp_path / "cli"
    assert main(["train-spm", "--base-model", tiny_sd_dir, "--dataset", pairs_parquet, "--init", str(hf_clip_folder),
                 "--output-dir", str(out), "--max-steps", "1", "--batch-size", "2", "--resolution", "32",
                 "--guidance-scale", "1"]) == 0
    assert (out / "config.json").is_file() and (out / "step_aware_preference_model.safetensors").is_file()


def fails_in_one_line(argv, capsys, expected):
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("diffalign: error:")]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("case", ["missing-column", "init-not-clip", "precision", "lr", "batch"])
def test_bad_input_is_one_line_before_models_load(case, tiny_sd_dir, hf_clip_folder, pairs_parquet, tmp_path, capsys,
                                                   monkeypatch):
    from helpers import png, write_parquet

    import diffalign.models as models

    monkeypatch.setattr(models, "load_adapter", lambda *a, **k: pytest.fail("a model loaded"))
    data, init, extra = pairs_parquet, str(hf_clip_folder), []
    if case == "missing-column":
        data = str(write_parquet(tmp_path / "bad.parquet", [{"caption": "a", "jpg_0": png((1, 2, 3)), "label_0": 1.0}]))
        expected = "lacks column(s) jpg_1"
    elif case == "init-not-clip":
        init, expected = tiny_sd_dir, "is not a CLIPModel folder"
    elif case == "precision":
        extra, expected = ["--mixed-precision", "fp8"], "--mixed-precision 'fp8' is not valid"
    elif case == "lr":
        extra, expected = ["--lr", "0"], "--lr 0.0 must be a positive"
    else:
        extra, expected = ["--batch-size", "20"], "fewer than one global batch"
    fails_in_one_line(["train-spm", "--base-model", tiny_sd_dir, "--dataset", data, "--init", init,
                       "--output-dir", str(tmp_path / "out"), "--resolution", "32", *extra], capsys, expected)


def test_the_toy_builder_holds_out_a_tenth_of_the_prompts(tmp_path):
    import pyarrow.parquet as pq
    from helpers import png, write_parquet

    from tools.toy.spm import split_pairs

    rows = [{"caption": f"prompt {i % 40}", "jpg_0": png((i, 0, 0), 8), "jpg_1": png((0, i, 0), 8), "label_0": 1.0,
             "label_1": 0.0} for i in range(60)]
    train, heldout, prompts = split_pairs(write_parquet(tmp_path / "pairs.parquet", rows), tmp_path / "work")
    train_prompts = set(pq.read_table(train).column("caption").to_pylist())
    heldout_prompts = set(pq.read_table(heldout).column("caption").to_pylist())
    assert len(prompts) == 4 and heldout_prompts == set(prompts) and not train_prompts & heldout_prompts
    assert pq.read_table(train).num_rows + pq.read_table(heldout).num_rows == 60
    assert split_pairs(tmp_path / "pairs.parquet", tmp_path / "again")[2] == prompts  # seeded
