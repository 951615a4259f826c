"""Video preference data (diffalign.video): VideoAlign's CSV labels, frame sampling, one
crop/flip per group, bad videos skipped and counted, JSONL pairs of video files."""

import csv
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.config import TrainConfig, validate
from diffalign.data import DataConfig, build_dataset, collate_groups
from diffalign.errors import DiffalignError
from diffalign.video import frame_indices, label_scores, read_csv_groups, write_video

HEADER = ["path_A", "path_B", "prompt", "VQ", "MQ", "TA", "fps_A", "num_frames_A", "fps_B", "num_frames_B"]


def solid_video(path, values, size=(20, 24), fps=8):
    """A video whose frame i is the solid grey values[i] (survives lossy coding to a few levels)."""
    frames = np.stack([np.full((size[0], size[1], 3), v, dtype=np.uint8) for v in values])
    return write_video(path, frames, fps=fps)


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        writer.writerows(rows)
    return path


def test_labels_by_dimension_and_by_majority():
    row = {"VQ": "A", "MQ": "B", "TA": "A"}
    assert label_scores(row, "VQ", "") == [1.0, 0.0]
    assert label_scores(row, "MQ", "") == [0.0, 1.0]
    assert label_scores(row, "overall", "") == [1.0, 0.0]  # two of three for A
    assert label_scores({"VQ": "A", "MQ": "same", "TA": "same"}, "overall", "") == [1.0, 0.0]  # "same" abstains
    assert label_scores({"VQ": "A", "MQ": "B", "TA": "same"}, "overall", "") == [0.5, 0.5]  # a tie
    assert label_scores({"VQ": "same", "MQ": "B", "TA": "A"}, "VQ", "") == [0.5, 0.5]
    with pytest.raises(DiffalignError, match="MQ is 'C'"):
        label_scores({"VQ": "A", "MQ": "C", "TA": "A"}, "overall", "line 2")


def _videos(folder, n=4, frames=12):
    for i in range(n):
        solid_video(folder / "clips" / f"v{i}.mp4", [(20 * i + 10 * t) % 250 for t in range(frames)])


def test_csv_winner_ties_relative_paths_and_bad_videos_counted(tmp_path):
    data = tmp_path / "set"
    _videos(data)
    (data / "clips" / "corrupt.mp4").write_bytes(b"this is not a video")
    solid_video(data / "clips" / "short.mp4", [0, 50, 100])
    table = write_csv(data / "pairs.csv", [
        ["clips/v0.mp4", "clips/v1.mp4", "p0", "A", "A", "B", 8, 12, 8, 12],   # A by majority, B by TA
        ["clips/v2.mp4", "clips/v3.mp4", "p1", "B", "same", "same", 8, 12, 8, 12],  # B
        ["clips/v1.mp4", "clips/v2.mp4", "p2", "A", "B", "same", 8, 12, 8, 12],  # tie overall: dropped
        ["clips/v3.mp4", "clips/missing.mp4", "p3", "A", "A", "A", 8, 12, 8, 12],
        ["clips/v0.mp4", "clips/corrupt.mp4", "p4", "A", "A", "A", 8, 12, 8, 12],
        ["clips/short.mp4", "clips/v0.mp4", "p5", "A", "A", "A", 8, 3, 8, 12],
    ])
    cfg = DataConfig(dataset=str(table), resolution=16, num_frames=5)
    dataset = build_dataset(cfg)  # pairwise: ties dropped
    assert [dataset.get_group(i).prompt for i, _ in dataset.keep] == ["p0", "p1", "p3", "p4", "p5"]
    assert [order for _, order in dataset.keep][:2] == [[0, 1], [1, 0]]  # winner first
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        items = [dataset[i] for i in range(len(dataset))]
    assert dataset.skipped.counts == {"missing": 1, "corrupt": 1, "short": 1}
    assert all(item["pixels"].shape == (2, 5, 3, 16, 16) for item in items)
    assert [item["prompt"] for item in items] == ["p0", "p1", "p0", "p0", "p0"]  # bad groups replaced by the next good one
    # p1's winner is B (v3): its first frame is grey 60, v2's is 40 (pixels in [-1, 1])
    first = (items[1]["pixels"][:, 0].mean(dim=(1, 2, 3)) + 1) / 2 * 255
    assert abs(first[0] - 60) < 4 and abs(first[1] - 40) < 4

    by_ta = build_dataset(DataConfig(dataset=str(table), resolution=16, num_frames=5, video_label="TA"))
    assert by_ta.keep[0] == (0, [1, 0])  # TA prefers B in row p0
    ranked = build_dataset(cfg, pairwise=False)  # ranked objectives keep the tie, with its 0.5 scores
    assert len(ranked) == 6 and ranked.get_group(2).scores == [0.5, 0.5]


def test_csv_reward_columns_replace_the_labels(tmp_path):
    _videos(tmp_path)
    path = tmp_path / "rewards.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path_A", "path_B", "prompt", "VQ", "MQ", "TA", "reward_A", "reward_B"])
        writer.writerow(["clips/v0.mp4", "clips/v1.mp4", "p", "A", "A", "A", 0.25, 1.5])
    (group,) = read_csv_groups(path)
    assert group.scores == [0.25, 1.5] and group.base_dir == tmp_path


def test_csv_missing_columns_and_bad_label_are_clear_errors(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("path_A,path_B,prompt,VQ\nx.mp4,y.mp4,p,A\n")
    with pytest.raises(DiffalignError, match="lacks column"):
        read_csv_groups(path)
    assert read_csv_groups(path, "VQ")[0].scores == [1.0, 0.0]
    with pytest.raises(DiffalignError, match="--video-label 'XX'"):
        read_csv_groups(path, "XX")


def test_frames_sampled_at_fps_identically_for_every_video_of_a_group(tmp_path):
    # v0 at 8 fps, frame t = grey 10 t; v1 at 16 fps, frame t = grey 5 t: the same times, so at
    # 4 fps both give greys 0, 20, 40 (indices 0, 2, 4 of v0 and 0, 4, 8 of v1).
    solid_video(tmp_path / "v0.mp4", [10 * t for t in range(12)], fps=8)
    solid_video(tmp_path / "v1.mp4", [5 * t for t in range(12)], fps=16)
    table = write_csv(tmp_path / "pairs.csv", [["v0.mp4", "v1.mp4", "p", "A", "A", "A", "", "", "", ""]])
    item = build_dataset(DataConfig(dataset=str(table), resolution=16, num_frames=3, fps=4.0))[0]
    greys = (item["pixels"].mean(dim=(2, 3, 4)) + 1) / 2 * 255  # (K, F)
    torch.testing.assert_close(greys, torch.tensor([[0.0, 20.0, 40.0]] * 2), atol=4, rtol=0)
    assert frame_indices(3, 4.0, 8.0) == [0, 2, 4] and frame_indices(3, None, 8.0) == [0, 1, 2]
    # Consecutive frames (no --fps): greys 0, 10, 20 and 0, 5, 10
    item = build_dataset(DataConfig(dataset=str(table), resolution=16, num_frames=3))[0]
    greys = (item["pixels"].mean(dim=(2, 3, 4)) + 1) / 2 * 255
    torch.testing.assert_close(greys, torch.tensor([[0.0, 10.0, 20.0], [0.0, 5.0, 10.0]]), atol=4, rtol=0)


def _frame_folder(folder, image, n):
    folder.mkdir(parents=True, exist_ok=True)
    for t in range(n):
        Image.fromarray(image).save(folder / f"{t:03d}.png")


def test_one_crop_and_flip_for_every_frame_of_every_video_of_a_group(tmp_path):
    # Lossless frame folders, every frame of both videos the same picture: frames of one group
    # come out identical exactly when they share the crop position and the flip.
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)
    _frame_folder(tmp_path / "a", image, 6)
    _frame_folder(tmp_path / "b", image, 6)
    table = write_csv(tmp_path / "pairs.csv", [["a", "b", f"p{i}", "A", "A", "A", 8, 6, 8, 6] for i in range(6)])
    dataset = build_dataset(DataConfig(dataset=str(table), resolution=12, num_frames=5, center_crop=False, random_flip=True))
    views = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            pixels = dataset[i]["pixels"]  # (2, 5, 3, 12, 12)
            assert torch.equal(pixels, pixels[:1, :1].expand_as(pixels)), "frames of one group differ in crop/flip"
            views.append(pixels[0, 0])
    assert len({v.numpy().tobytes() for v in views}) > 1, "the crop/flip draw never changed"


def test_jsonl_pairs_and_ranked_lists_of_video_files(tmp_path):
    _videos(tmp_path, n=3)
    lines = [
        {"prompt": "p0", "chosen": "clips/v0.mp4", "rejected": "clips/v1.mp4"},
        {"prompt": "p1", "images": ["clips/v0.mp4", "clips/v1.mp4", "clips/v2.mp4"], "scores": [0.1, 0.9, 0.5]},
        {"prompt": "p2", "chosen": "clips/v2.mp4", "rejected": "clips/v0.mp4", "chosen_score": 0.7, "rejected_score": 0.2},
    ]
    path = tmp_path / "set.jsonl"
    path.write_text("".join(__import__("json").dumps(line) + "\n" for line in lines))
    dataset = build_dataset(DataConfig(dataset=str(path), resolution=16, num_frames=5), pairwise=False, )
    items = [dataset[i] for i in range(len(dataset))]
    assert items[1]["pixels"].shape == (3, 5, 3, 16, 16)
    assert items[1]["scores"].tolist() == pytest.approx([0.9, 0.5, 0.1])  # best first
    assert items[2]["scores"].tolist() == pytest.approx([0.7, 0.2])
    batch = collate_groups([items[0], items[2]])
    assert batch["pixels"].shape == (2, 2, 5, 3, 16, 16)  # (B, K, F, 3, R, R)


@pytest.mark.parametrize("overrides,match", [
    ({"video_label": "XX"}, "--video-label 'XX'"),
    ({"fps": 8.0}, "set --num-frames too"),
    ({"num_frames": 0}, "--num-frames 0"),
    ({"num_frames": 5, "fps": -1.0}, "--fps -1.0"),
    ({"expert": "middle"}, "--expert 'middle'"),
    ({"dataset": "pairs.csv"}, "video CSV: set --num-frames"),
])
def test_video_config_values_are_checked_before_anything_loads(overrides, match):
    cfg = TrainConfig(**{"method": "flow-dpo", "model": "m", "dataset": "d.jsonl", **overrides})
    with pytest.raises(DiffalignError, match=match):
        validate(cfg)


@pytest.mark.parametrize("recipe", ["flow-dpo", "flow-rwr"])
def test_wan_recipes_validate(recipe):
    from diffalign.config import load_yaml, merge
    from diffalign.paths import configs_dir

    cfg = merge(TrainConfig(), load_yaml(configs_dir() / "wan" / f"{recipe}.yaml"), recipe)
    validate(cfg)
    assert cfg.method == recipe and cfg.num_frames == 33 and cfg.resolution == 480 and cfg.lora_rank == 32
