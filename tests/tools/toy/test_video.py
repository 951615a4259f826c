"""The toy video world: moving shapes, prompts, the split, mp4/GIF writing."""

import numpy as np
import pytest
import torch

from tools.toy.video import (
    FPS, NUM_FRAMES, VALUES, VideoScene, all_video_scenes, parse_video_prompt, render_video, split_video_prompts,
    video_array, write_gif, write_mp4,
)


def centroid(frame: np.ndarray) -> tuple[float, float]:
    """Centre of the pixels far from the frame's corner colour, in pixels (x, y)."""
    distance = np.abs(frame.astype(float) - frame[0, 0].astype(float)).sum(-1)
    ys, xs = np.nonzero(distance > 60)
    return xs.mean(), ys.mean()


def scene(**kw) -> VideoScene:
    base = dict(count=1, size="large", colour="red", shape="circle", direction="left", speed="quickly",
                background="white")
    return VideoScene(**{**base, **kw})


def test_prompt_names_the_motion_and_parses_back():
    s = scene(count=2, size="small", direction="up", speed="slowly", background="gray")
    assert s.prompt == "two small red circles moving up slowly on a gray background"
    assert parse_video_prompt(s.prompt) == s
    assert s.frame_prompts() == ["two small red circles at the top on a gray background",
                                 "two small red circles at the bottom on a gray background"]
    with pytest.raises(ValueError):
        parse_video_prompt("a cat")


def test_split_is_disjoint_complete_and_covers_every_value():
    train, heldout = split_video_prompts()
    assert len(all_video_scenes()) == 2160 and len(train) + len(heldout) == 2160
    assert not set(train) & set(heldout)
    for attribute, values in VALUES.items():
        assert {getattr(s, attribute) for s in heldout} == set(values)
    assert split_video_prompts() == (train, heldout)


def test_render_is_deterministic_and_seeded():
    a, b, c = video_array(scene(), 3), video_array(scene(), 3), video_array(scene(), 4)
    assert a.shape == (NUM_FRAMES, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("direction,axis,sign", [("left", 0, -1), ("right", 0, 1), ("up", 1, -1), ("down", 1, 1)])
@pytest.mark.parametrize("speed,pixels", [("slowly", 1.0), ("quickly", 2.0)])
def test_shapes_move_the_named_way_at_the_named_speed(direction, axis, sign, speed, pixels):
    frames = video_array(scene(direction=direction, speed=speed), 0)
    centres = np.array([centroid(f) for f in frames])
    step = np.diff(centres, axis=0)
    assert np.allclose(step[:, axis], sign * pixels, atol=0.3)  # anti-aliasing moves the mask a little
    assert np.allclose(step[:, 1 - axis], 0, atol=0.3)
    # one column moving sideways, one row moving up and down
    three = video_array(scene(count=3, size="small", direction=direction, speed=speed), 0)[0]
    distance = np.abs(three.astype(float) - three[0, 0].astype(float)).sum(-1) > 60
    spread = np.nonzero(distance)[axis]  # (rows, columns): a column spreads over rows
    assert spread.max() - spread.min() > 20


def test_mp4_and_gif_read_back_within_codec_tolerance(tmp_path):
    from diffalign.rewards.toy_video import read_video_frames
    from diffalign.rewards.videoreward import decode_video

    frames = video_array(scene(colour="blue", background="gray"), 1)
    mp4 = write_mp4(frames, tmp_path / "v.mp4")
    gif = write_gif(frames, tmp_path / "v.gif")
    decoded, rate = decode_video(mp4)
    assert len(decoded) == NUM_FRAMES and rate == FPS
    for path, tolerance in ((mp4, 0.04), (gif, 0.04)):
        back = read_video_frames(path)
        assert back.shape == (NUM_FRAMES, 3, 32, 32)
        original = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
        assert (back - original).abs().mean() < tolerance
    assert len(render_video(scene(), 0, num_frames=5)) == 5
