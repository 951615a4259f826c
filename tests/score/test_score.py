"""`diffalign score` end to end on the tiny PickScore folder."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from diffalign.cli import main
from diffalign.rewards import load_reward

from helpers import random_pil


@pytest.fixture
def images(tmp_path):
    paths = []
    for i, size in enumerate([(64, 48), (40, 80), (32, 32)]):
        paths.append(tmp_path / f"img{i}.png")
        random_pil(*size, seed=i).save(paths[-1])
    return paths


def test_prompt_and_images_to_csv(tmp_path, images, hf_clip_folder, capsys):
    out = tmp_path / "scores.csv"
    argv = ["score", "--reward", f"pickscore@{hf_clip_folder},toy-judge@{hf_clip_folder}",
            "--prompt", "a cat", *map(str, images), "--output-file", str(out), "--batch-size", "2"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "img0.png" in table and "pickscore" in table and "toy-judge" in table
    with out.open() as f:
        rows = list(csv.DictReader(f))
    expected = load_reward("pickscore", path=str(hf_clip_folder)).score([str(p) for p in images], "a cat")
    got = torch.tensor([float(r["pickscore"]) for r in rows])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert [r["toy-judge"] for r in rows] == [r["pickscore"] for r in rows]


def test_jsonl_input_with_a_corrupt_image(tmp_path, images, hf_clip_folder, capsys):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    lines = [{"prompt": "a dog", "image": "img0.png"}, {"prompt": "a cat", "image": "broken.png"},
             {"prompt": "a bird", "image": "img2.png"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    base = ["score", "--reward", f"pickscore@{hf_clip_folder}", "--input", str(tmp_path / "in.jsonl")]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and "corrupt" in err and "--skip-bad" in err and err.count("\n") == 1
    out = tmp_path / "out.jsonl"
    with pytest.warns(UserWarning, match="skipping .*broken.png"):
        assert main(base + ["--skip-bad", "--output-file", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["a dog", "a bird"]
    reward = load_reward("pickscore", path=str(hf_clip_folder))
    expected = reward.score([str(images[0]), str(images[2])], ["a dog", "a bird"])
    torch.testing.assert_close(torch.tensor([r["pickscore"] for r in records]), expected, atol=1e-4, rtol=0)


def test_usage_errors(tmp_path, images, capsys):
    assert main(["score", "--reward", "pickscore"]) == 2
    assert "nothing to score" in capsys.readouterr().err
    assert main(["score", "--reward", "nope", "--prompt", "x", "a.png"]) == 2
    err = capsys.readouterr().err
    assert "not found" in err  # images are read before any model loads
    assert main(["score", "--reward", "hpsv2", "--reward-opt", "pickscore:scale=1", "--prompt", "x", str(images[0])]) == 2
    assert "--reward-opt 'pickscore:scale=1' names pickscore" in capsys.readouterr().err
