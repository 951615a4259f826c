"""toy-video-reward and toy-video-judge: the motion terms, the frame terms, files in == tensors in."""

from dataclasses import replace

import pytest
import torch

from diffalign.errors import DiffalignError
from diffalign.paths import asset
from diffalign.rewards import load_reward
from diffalign.rewards.toy_video import (
    MQ_WEIGHT, SPEEDS, TA_WEIGHT, centroid_motion, flow_motion, frame_prompts, parse_prompt,
)
from tools.toy.video import VideoScene, video_array, video_tensor, write_gif, write_mp4

pytestmark = pytest.mark.skipif(not (asset("toy-reward") / "config.json").is_file(),
                                reason="toy assets not built: python -m tools.toy build")

FLIP = {"left": "right", "right": "left", "up": "down", "down": "up"}
SCENES = [
    VideoScene(1, "large", "red", "circle", "left", "quickly", "white"),
    VideoScene(2, "small", "blue", "square", "down", "slowly", "gray"),
    VideoScene(3, "large", "yellow", "triangle", "up", "quickly", "black"),
    VideoScene(1, "small", "green", "circle", "right", "slowly", "white"),
]


@pytest.fixture(scope="module")
def rewards():
    return {name: load_reward(name) for name in ("toy-video-reward", "toy-video-judge")}


@pytest.fixture(scope="module")
def videos():
    return torch.stack([video_tensor(s, 7) for s in SCENES])


def test_prompt_grammar():
    assert parse_prompt("one small red circle moving left on a gray background")["speed"] is None
    assert frame_prompts(SCENES[0].prompt) == ["one large red circle on the left on a white background",
                                              "one large red circle on the right on a white background"]
    with pytest.raises(DiffalignError, match="not a toy video prompt"):
        parse_prompt("a red circle")


@pytest.mark.parametrize("measure", [centroid_motion, flow_motion])
def test_both_motion_measures_see_the_rendered_velocity(measure, videos):
    velocity, flicker = measure(videos)
    for scene, v in zip(SCENES, velocity):
        unit = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[scene.direction]
        along = v[0] * unit[0] + v[1] * unit[1]
        assert 0.6 * SPEEDS[scene.speed] < along < 1.4 * SPEEDS[scene.speed]
    assert (flicker < 0.1).all()
    # the two estimates are different functions of the frames
    assert not torch.allclose(centroid_motion(videos)[0], flow_motion(videos)[0], atol=0.05)


@pytest.mark.parametrize("name", ["toy-video-reward", "toy-video-judge"])
def test_motion_term_flips_sign_with_the_direction_and_vanishes_without_motion(rewards, videos, name):
    reward = rewards[name]
    right = reward.score_dimensions(videos, [s.prompt for s in SCENES])
    wrong = reward.score_dimensions(videos, [replace(s, direction=FLIP[s.direction]).prompt for s in SCENES])
    assert (right["TA"] > 1).all()
    assert torch.allclose(wrong["TA"], -right["TA"], atol=1e-5)
    assert torch.allclose(wrong["VQ"], right["VQ"])  # the frame prompts name the same two positions
    assert (right["Overall"] > wrong["Overall"]).all()
    still = reward.score_dimensions(videos[:, :1].expand_as(videos).contiguous(), [s.prompt for s in SCENES])
    assert still["TA"].abs().max() < 1e-4 and (still["MQ"] < right["MQ"]).all()
    assert torch.allclose(right["Overall"], right["VQ"] + right["MQ"] + right["TA"])
    assert torch.equal(reward.score(videos, [s.prompt for s in SCENES]), right["Overall"])


def test_scores_equal_an_independent_computation(rewards, videos):
    """VQ from the image rewards frame by frame, TA/MQ from the centroid of the hard mask."""
    toy = load_reward("toy-reward")
    reward = rewards["toy-video-reward"]
    parts = reward.score_dimensions(videos, [s.prompt for s in SCENES])
    for i, scene in enumerate(SCENES):
        per_frame = torch.stack([toy.score(videos[i], [p] * videos.shape[1]) for p in scene.frame_prompts()])
        assert torch.allclose(parts["VQ"][i], per_frame.max(0).values.mean(), atol=1e-4)
        frames = torch.from_numpy(video_array(scene, 7)).float()
        far = (frames - frames[:, :1, :1]).abs().sum(-1) > 0.15 * 255  # (F, H, W)
        ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        cx = torch.stack([xs[m].mean() for m in far])
        cy = torch.stack([ys[m].mean() for m in far])
        t = torch.arange(len(cx), dtype=torch.float32)
        slope = lambda c: ((c - c.mean()) * (t - t.mean())).sum() / ((t - t.mean()) ** 2).sum()
        unit = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[scene.direction]
        along = slope(cx) * unit[0] + slope(cy) * unit[1]
        across = (slope(cx) * unit[1] + slope(cy) * unit[0]).abs()
        # the soft mask weighs anti-aliased edges a little differently from the hard one
        assert abs(parts["TA"][i] - TA_WEIGHT * along * (len(t) - 1)) < 0.15 * TA_WEIGHT * (len(t) - 1) * along.abs()
        mq = -MQ_WEIGHT * ((along - SPEEDS[scene.speed]).abs() + across)
        assert abs(parts["MQ"][i] - mq) < 0.5


@pytest.mark.parametrize("name", ["toy-video-reward", "toy-video-judge"])
def test_files_score_as_tensors_within_codec_tolerance(rewards, tmp_path, name):
    reward = rewards[name]
    scene = SCENES[0]
    frames = video_array(scene, 3)
    mp4, gif = write_mp4(frames, tmp_path / "a.mp4"), write_gif(frames, tmp_path / "a.gif")
    folder = tmp_path / "frames"
    folder.mkdir()
    from PIL import Image

    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{i:03d}.png")
    tensor = video_tensor(scene, 3)[None]
    exact = reward.score_dimensions(tensor, [scene.prompt], exact=True)
    from_files = reward.score_dimensions([str(mp4), str(gif), str(folder)], [scene.prompt] * 3)
    # a frame folder holds the exact pixels; mp4 (yuv420p) and GIF (palette) are lossy
    for dim in ("VQ", "MQ", "TA"):
        assert torch.allclose(from_files[dim][2], exact[dim][0], atol=1e-4)
    assert (from_files["Overall"][:2] - exact["Overall"][0]).abs().max() < 1.0
    assert (from_files["TA"][:2] - exact["TA"][0]).abs().max() < 0.3


def test_tensor_scores_are_differentiable(rewards, videos):
    x = videos.clone().requires_grad_(True)
    rewards["toy-video-reward"].score(x, [s.prompt for s in SCENES]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bad_input_is_one_line(rewards, videos):
    with pytest.raises(DiffalignError, match="not a toy video prompt"):
        rewards["toy-video-judge"].score(videos[:1], ["a cat"])
    with pytest.raises(DiffalignError):
        rewards["toy-video-judge"].score(videos[0], ["x"])


def test_diffalign_score_reads_mp4_files_and_reports_each_dimension(rewards, tmp_path, capsys):
    import csv

    from diffalign.cli import main

    files = [write_mp4(video_array(s, 1), tmp_path / f"v{i}.mp4") for i, s in enumerate(SCENES[:2])]
    table = tmp_path / "in.csv"
    table.write_text("prompt,image\n" + "".join(f"{s.prompt},{f.name}\n" for s, f in zip(SCENES, files)))
    out = tmp_path / "scores.csv"
    assert main(["score", "--reward", "toy-video-judge", "--input", str(table), "--output-file", str(out)]) == 0
    assert "toy-video-judge.TA" in capsys.readouterr().out
    with out.open() as f:
        rows = list(csv.DictReader(f))
    expected = rewards["toy-video-judge"].score_dimensions([str(f) for f in files], [s.prompt for s in SCENES[:2]])
    for dim, key in (("Overall", "toy-video-judge"), ("VQ", "toy-video-judge.VQ"), ("TA", "toy-video-judge.TA")):
        assert torch.allclose(torch.tensor([float(r[key]) for r in rows]), expected[dim], atol=1e-4)
