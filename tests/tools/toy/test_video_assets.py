"""The shipped toy video world: the Wan-layout generator, its preference data, the quickstart."""

import csv
import json
from pathlib import Path

import pytest
import torch

from diffalign.cli import main
from diffalign.paths import asset, assets_dir

pytestmark = pytest.mark.skipif(not (asset("toy-video") / "model_index.json").is_file(),
                                reason="toy video assets not built: python -m tools.toy.video_build")

DATA = asset("toy-data") / "toy-video"


def quickstart_config(argv):
    from diffalign.cli import build_parser
    from diffalign.config import resolve_config
    from diffalign.train import quickstart_base

    full = ["train", *argv]
    args = build_parser(full)[0].parse_args(full)
    return resolve_config(args, base=quickstart_base(args))


@pytest.mark.parametrize("method", ["flow-dpo", "flow-rwr"])
def test_the_toy_video_quickstart_resolves(method):
    cfg = quickstart_config(["--method", method, "--model", "toy-video"])
    assert (cfg.model, cfg.dataset, cfg.num_frames, cfg.resolution) == ("toy-video", "toy-data/toy-video/pairs.csv", 9, 32)
    assert cfg.output_dir == f"outputs/quickstart-{method}-toy-video"
    assert cfg.eval_rewards == ["toy-video-reward", "toy-video-judge"]
    # a method with image recipes still runs on the image toys without --model
    assert quickstart_config(["--method", "flow-dpo"]).model == "toy-flow"


def test_generator_is_a_wan_pipeline_and_the_sampler_matches_it():
    from diffusers import DiffusionPipeline, WanPipeline

    from diffalign.sampler import generate

    pipe = DiffusionPipeline.from_pretrained(asset("toy-video"))
    assert isinstance(pipe, WanPipeline) and pipe.transformer.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    prompts = ["one large red circle moving left quickly on a white background"] * 2
    ours = generate(pipe, prompts, seeds=[0, 1], num_inference_steps=3, guidance_scale=4.0, height=32, width=32,
                    num_frames=9)
    theirs = pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in (0, 1)], num_inference_steps=3,
                  guidance_scale=4.0, height=32, width=32, num_frames=9, output_type="pt").frames
    assert ours.shape == (2, 9, 3, 32, 32)
    assert (ours - theirs).abs().max() < 1e-4
    assert json.loads((asset("toy-video") / "diffalign.json").read_text()) == {
        "num_inference_steps": 20, "guidance_scale": 4.0, "height": 32, "width": 32, "num_frames": 9}


def test_the_padded_text_attention_used_in_training_equals_the_pipelines_512_positions():
    from diffusers import WanPipeline

    from tools.toy import video_generator as vg

    pipe = WanPipeline.from_pretrained(asset("toy-video"))
    prompts = ["two small blue squares moving up slowly on a gray background", ""]
    x, t = torch.randn(2, 4, 5, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([100.0, 800.0])
    with torch.no_grad():
        full = pipe.transformer(hidden_states=x, timestep=t,
                                encoder_hidden_states=pipe._get_t5_prompt_embeds(prompts, max_sequence_length=512)).sample
        originals = vg.use_padded_text_attention(pipe.transformer, vg.MAX_SEQUENCE_LENGTH - vg.TEXT_LENGTH)
        short = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=vg.short_prompt_embeds(pipe, prompts)).sample
        vg.restore_processors(pipe.transformer, originals)
    assert (full - short).abs().max() < 1e-4


def test_preference_data_follows_videoaligns_schema_and_the_rewards_labels():
    from diffalign.rewards import load_reward
    from diffalign.video import read_csv_groups

    with (DATA / "pairs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 100
    assert list(rows[0])[:10] == ["path_A", "path_B", "prompt", "VQ", "MQ", "TA", "fps_A", "num_frames_A", "fps_B",
                                  "num_frames_B"]
    for row in rows:
        assert (DATA / row["path_A"]).is_file() and (DATA / row["path_B"]).is_file()
        assert {row[d] for d in ("VQ", "MQ", "TA")} <= {"A", "B", "same"}
    assert {r["path_A"].split("_")[-1] for r in rows} == {"A.mp4"}  # A/B order drawn per prompt
    winners_a = sum(float(r["reward_A"]) > float(r["reward_B"]) for r in rows)
    assert 0.3 * len(rows) < winners_a < 0.7 * len(rows)
    assert len(read_csv_groups(DATA / "pairs.csv")) == len(rows)
    # labels are toy-video-reward's scores of the files themselves
    reward = load_reward("toy-video-reward")
    some = rows[:4]
    scores = reward.score_dimensions([str(DATA / r[f"path_{s}"]) for r in some for s in "AB"],
                                     [r["prompt"] for r in some for _ in "AB"])
    got = torch.tensor([float(r[f"reward_{s}"]) for r in some for s in "AB"])
    assert torch.allclose(got, scores["Overall"], atol=1e-3)
    for i, row in enumerate(some):
        ta_a, ta_b = scores["TA"][2 * i], scores["TA"][2 * i + 1]
        assert row["TA"] == ("same" if abs(ta_a - ta_b) < 0.1 else "A" if ta_a > ta_b else "B")


def test_all_assets_stay_small():
    total = sum(f.stat().st_size for f in Path(assets_dir()).rglob("*") if f.is_file())
    video = sum(f.stat().st_size for folder in (asset("toy-video"), DATA) for f in folder.rglob("*") if f.is_file())
    assert total < 45 * 2**20 and video < 8 * 2**20


def test_short_toy_video_quickstart_writes_its_evaluation(tmp_path):
    out = tmp_path / "q"
    code = main(["train", "--method", "flow-dpo", "--model", "toy-video", "--max-steps", "2", "--output-dir", str(out),
                 "--eval-max-prompts", "1", "--eval-num-images", "1", "--num-inference-steps", "2"])
    assert code == 0
    report = json.loads((out / "eval" / "eval.json").read_text())
    assert set(report["rewards"]) == {"toy-video-reward", "toy-video-judge"}
    assert set(report["rewards"]["toy-video-judge"]["dimensions"]) == {"VQ", "MQ", "TA"}
    assert (out / "eval" / "grid.gif").is_file() and len(list((out / "eval" / "videos" / "model").glob("*.mp4"))) == 1
