"""`diffalign eval` on a video model: mp4s out and scored from the files, VQ/MQ/TA per dimension,
an animated side-by-side grid."""

import json

import pytest
import torch

from diffalign.evaluate import evaluate
from diffalign.paths import asset
from diffalign.testing import tiny_pipeline

pytestmark = pytest.mark.skipif(not (asset("toy-reward") / "config.json").is_file(),
                                reason="toy assets not built: python -m tools.toy build")

PROMPTS = ["one large red circle moving left quickly on a white background",
           "two small blue squares moving up slowly on a gray background"]
FRAMES, SIZE = 5, 16


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    out = tmp_path_factory.mktemp("video-eval")
    results = evaluate(tiny_pipeline("wan", seed=1), tiny_pipeline("wan", seed=0), PROMPTS,
                       ["toy-video-reward", "toy-video-judge"], num_images=2, seed=3, output_dir=out,
                       num_inference_steps=2, guidance_scale=2.0, resolution=SIZE, num_frames=FRAMES, fps=8,
                       batch_size=3, device="cpu", verbose=False)
    return out, results


def test_writes_every_video_as_mp4_and_an_animated_grid(evaluated):
    from PIL import Image

    from diffalign.rewards.toy_video import read_video_frames

    out, results = evaluated
    for side in ("baseline", "model"):
        files = sorted((out / "videos" / side).glob("*.mp4"))
        assert len(files) == 4
        assert read_video_frames(files[0]).shape == (FRAMES, 3, SIZE, SIZE)
    with Image.open(out / "grid.gif") as grid:
        assert grid.n_frames == FRAMES and grid.width > 4 * 128
    assert (out / "eval.json").is_file() and not (out / "grid.png").exists()
    assert json.loads((out / "eval.json").read_text())["call_kwargs"]["num_frames"] == FRAMES


def test_per_dimension_scores_are_those_of_the_mp4_files(evaluated):
    from diffalign.rewards import load_reward

    out, results = evaluated
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [p for p in PROMPTS for _ in range(2)]
    judge = load_reward("toy-video-judge")
    for side in ("baseline", "model"):
        files = [str(out / r["videos"][side]) for r in rows]
        expected = judge.score_dimensions(files, [r["prompt"] for r in rows])
        assert torch.allclose(torch.tensor([r["toy-video-judge"][side] for r in rows]), expected["Overall"], atol=1e-5)
        for dim in ("VQ", "MQ", "TA"):
            got = torch.tensor([r[f"toy-video-judge.{dim}"][side] for r in rows])
            assert torch.allclose(got, expected[dim], atol=1e-5)
    for name in ("toy-video-reward", "toy-video-judge"):
        entry = results["rewards"][name]
        assert set(entry["dimensions"]) == {"VQ", "MQ", "TA"}
        model = [r[name]["model"] for r in rows]
        base = [r[name]["baseline"] for r in rows]
        wins = sum(1.0 if m > b else 0.5 if m == b else 0.0 for m, b in zip(model, base)) / len(rows)
        assert entry["win_rate"] == pytest.approx(wins)
        vq = [r[f"{name}.VQ"]["model"] for r in rows]
        assert entry["dimensions"]["VQ"]["model"]["reward_mean"] == pytest.approx(sum(vq) / len(vq), abs=1e-6)


def test_format_table_lists_the_dimensions(evaluated):
    from diffalign.evaluate import format_table

    table = format_table(evaluated[1])
    assert "toy-video-judge" in table and "  VQ" in table and "  TA" in table


def test_label_builds_a_video_syn_pic_set_in_videoalign_csv(tmp_path):
    """`diffalign label` on a video pipeline: K mp4s a prompt scored from the files, ranked.jsonl,
    VideoAlign's pairs.csv whose per-dimension labels follow the reward's dimensions."""
    import csv

    from diffalign.label import LabelConfig, label
    from diffalign.rewards import load_reward

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(p + "\n" for p in PROMPTS))
    out = tmp_path / "syn"
    cfg = LabelConfig(model="unused", prompts=str(prompts), output_dir=str(out), rewards=["toy-video-reward"],
                      num_images=3, seed=0, batch_size=3, num_inference_steps=2, guidance_scale=2.0,
                      resolution=SIZE, num_frames=FRAMES, fps=8.0, device="cpu")
    result = label(cfg, pipe=tiny_pipeline("wan", seed=2))
    assert result["rows"] == 2 and (out / "samples.gif").is_file()
    ranked = [json.loads(line) for line in (out / "ranked.jsonl").read_text().splitlines()]
    reward = load_reward("toy-video-reward")
    for row in ranked:
        assert len(row["images"]) == 3 and all(f.endswith(".mp4") for f in row["images"])
        scores = reward.score_dimensions([str(out / f) for f in row["images"]], [row["prompt"]] * 3)
        assert row["rewards"]["toy-video-reward"] == pytest.approx(scores["Overall"].tolist(), abs=1e-5)
        assert row["rewards"]["toy-video-reward"] == sorted(row["rewards"]["toy-video-reward"], reverse=True)
        assert row["dimensions"]["toy-video-reward"]["TA"] == pytest.approx(scores["TA"].tolist(), abs=1e-5)
    with (out / "pairs.csv").open() as f:
        pairs = list(csv.DictReader(f))
    assert len(pairs) == 2
    for pair, row in zip(pairs, ranked):
        assert (pair["path_A"], pair["path_B"]) == (row["images"][0], row["images"][-1])
        assert (out / pair["path_A"]).is_file() and pair["prompt"] == row["prompt"]
        assert (pair["num_frames_A"], pair["fps_B"]) == (str(FRAMES), "8.0")
        for dim in ("VQ", "MQ", "TA"):
            a, b = row["dimensions"]["toy-video-reward"][dim][0], row["dimensions"]["toy-video-reward"][dim][-1]
            assert pair[dim] == ("A" if a > b else "B" if b > a else "same")
