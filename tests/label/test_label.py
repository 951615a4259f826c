"""`diffalign label`: ranking maths by hand, determinism, resume, outputs that load back."""

import json

import pyarrow.parquet as pq
import pytest
import torch
from helpers import brightness, redness

from diffalign import label as lab
from diffalign.errors import DiffalignError
from diffalign.rewards import REWARDS, register_reward


def make_cfg(prompts_file, out, **kw):
    base = dict(model="unused", prompts=str(prompts_file), output_dir=str(out), rewards=["test-red", "test-bright"],
                num_images=3, seed=7, batch_size=4, num_inference_steps=2, guidance_scale=3.0, resolution=32)
    base.update(kw)
    return lab.LabelConfig(**base)


@pytest.fixture(autouse=True)
def registered_rewards():
    register_reward("test-red", redness, overwrite=True)
    register_reward("test-bright", brightness, overwrite=True)
    yield
    for name in ("test-red", "test-bright", "test-flaky"):
        REWARDS.pop(name, None)


def test_win_fractions_and_ranks_by_hand():
    # reward A ranks images 2 > 0 > 1; reward B ranks 0 > 2 > 1. Wins: img0 1+2, img1 0, img2 2+1.
    psi = lab.win_fractions([[0.5, 0.1, 0.9], [3.0, 1.0, 2.0]])
    assert psi == [3 / 4, 0.0, 3 / 4]
    order, scores, _ = lab.rank_images({"a": [0.5, 0.1, 0.9], "b": [3.0, 1.0, 2.0]}, "avg-rank", None)
    assert order == [0, 2, 1] and scores == [0.75, 0.75, 0.0]  # tie keeps index order
    assert lab.competition_ranks(scores) == [1, 1, 3]
    # Ties in a reward win nothing.
    assert lab.win_fractions([[1.0, 1.0, 0.0]]) == [0.5, 0.5, 0.0]
    # Weighted: 1*a - 1*b = [-2.5, -0.9, -1.1] -> order 1, 2, 0
    order, scores, key = lab.rank_images({"a": [0.5, 0.1, 0.9], "b": [3.0, 1.0, 2.0]}, "weighted", [1.0, -1.0])
    assert order == [1, 2, 0] and scores == [1.0, 0.5, 0.0]
    assert key == pytest.approx([-0.9, -1.1, -2.5])


def test_pair_selection():
    assert lab.select_pairs([1.0, 0.5, 0.0], "best-worst", 0) == [(0, 2)]
    assert lab.select_pairs([0.5, 0.5], "best-worst", 0) == []  # a tie makes no pair
    assert lab.select_pairs([1.0, 0.6, 0.5, 0.0], "margin", 0.3) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]


def test_label_writes_ranked_lists_and_pairs(tiny_sd, prompts_file, tmp_path):
    result = lab.label(make_cfg(prompts_file, tmp_path / "out"), pipe=tiny_sd)
    rows = [json.loads(line) for line in (tmp_path / "out" / "ranked.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and result["prompts_labelled"] == 5 and result["images"] == 15
    from PIL import Image
    import numpy as np

    for row in rows:
        assert row["scores"] == sorted(row["scores"], reverse=True) and len(row["images"]) == 3
        # Scores recomputed from the saved PNGs agree with what was written.
        pixels = np.stack([np.asarray(Image.open(tmp_path / "out" / f)) for f in row["images"]])
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
        assert redness(images, None).tolist() == pytest.approx(row["rewards"]["test-red"], abs=1e-6)
        table = [redness(images, None).tolist(), brightness(images, None).tolist()]
        assert lab.win_fractions(table) == pytest.approx(row["scores"])
    pairs = pq.read_table(tmp_path / "out" / "pairs.parquet").to_pylist()
    assert len(pairs) == sum(r["scores"][0] > r["scores"][-1] for r in rows) == result["num_pairs"]
    first = next(r for r in rows if r["scores"][0] > r["scores"][-1])
    pair = next(p for p in pairs if p["caption"] == first["prompt"])
    assert pair["jpg_0"] == (tmp_path / "out" / first["images"][0]).read_bytes()
    assert pair["jpg_1"] == (tmp_path / "out" / first["images"][-1]).read_bytes()
    assert (pair["label_0"], pair["label_1"]) == (1.0, 0.0)


def test_label_is_deterministic_given_seeds(tiny_sd, prompts_file, tmp_path):
    lab.label(make_cfg(prompts_file, tmp_path / "a"), pipe=tiny_sd)
    lab.label(make_cfg(prompts_file, tmp_path / "b"), pipe=tiny_sd)
    lab.label(make_cfg(prompts_file, tmp_path / "c", seed=8), pipe=tiny_sd)
    a, b, c = ((tmp_path / d / "ranked.jsonl").read_text() for d in "abc")
    assert a == b and a != c
    assert (tmp_path / "a/images/000003_01.png").read_bytes() == (tmp_path / "b/images/000003_01.png").read_bytes()


def test_resume_after_interruption_equals_uninterrupted_run(tiny_sd, prompts_file, tmp_path):
    lab.label(make_cfg(prompts_file, tmp_path / "full"), pipe=tiny_sd)

    calls = {"n": 0}

    def flaky(images, prompts):  # dies on the 4th prompt, like a killed job
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return redness(images, prompts)

    register_reward("test-red", flaky, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        lab.label(make_cfg(prompts_file, tmp_path / "cut"), pipe=tiny_sd)
    assert len(list((tmp_path / "cut" / "rows").glob("*.json"))) == 3
    register_reward("test-red", redness, overwrite=True)
    result = lab.label(make_cfg(prompts_file, tmp_path / "cut"), pipe=tiny_sd)
    assert result["prompts_labelled"] == 2
    assert (tmp_path / "cut/ranked.jsonl").read_text() == (tmp_path / "full/ranked.jsonl").read_text()
    assert pq.read_table(tmp_path / "cut/pairs.parquet").equals(pq.read_table(tmp_path / "full/pairs.parquet"))
    # A rerun of a finished job does nothing and changes nothing.
    assert lab.label(make_cfg(prompts_file, tmp_path / "cut"), pipe=tiny_sd)["prompts_labelled"] == 0
    with pytest.raises(DiffalignError, match="seed"):
        lab.label(make_cfg(prompts_file, tmp_path / "cut", seed=1), pipe=tiny_sd)


def test_outputs_load_through_the_training_data_layer(tiny_sd, prompts_file, tmp_path):
    data = pytest.importorskip("diffalign.data")
    lab.label(make_cfg(prompts_file, tmp_path / "out", pairs="margin", margin=0.0), pipe=tiny_sd)
    rows = [json.loads(line) for line in (tmp_path / "out" / "ranked.jsonl").read_text().splitlines()]
    ranked = data.build_dataset(data.DataConfig(dataset=str(tmp_path / "out" / "ranked.jsonl"), resolution=16,
                                                random_flip=False), pairwise=False)
    group = ranked[0]
    assert group["pixels"].shape == (3, 3, 16, 16) and group["prompt"] == rows[0]["prompt"]
    assert group["scores"].tolist() == pytest.approx(rows[0]["scores"])
    pairs = data.build_dataset(data.DataConfig(dataset=str(tmp_path / "out" / "pairs.parquet"), resolution=16,
                                               random_flip=False), pairwise=True)
    table = pq.read_table(tmp_path / "out" / "pairs.parquet")
    assert len(pairs) == table.num_rows > 0
    assert pairs[0]["pixels"].shape == (2, 3, 16, 16) and pairs[0]["scores"].tolist() == [1.0, 0.0]


def test_label_cli_with_a_saved_pipeline(tiny_sd_dir, prompts_file, tmp_path, capsys):
    from diffalign.cli import main

    code = main(["label", "--model", str(tiny_sd_dir), "--prompts", str(prompts_file), "--num-images", "2",
                 "--reward", "test-red", "--output-dir", str(tmp_path / "cli"), "--num-inference-steps", "1", "--resolution", "32",
                 "--captions", "perturb"])
    assert code == 0
    pairs = pq.read_table(tmp_path / "cli" / "pairs.parquet").to_pylist()
    assert pairs and all(p["caption_0"] == p["caption"] and p["caption_1"] != p["caption"] for p in pairs)
    assert "images/s" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_images=1), "at least 2 images"),
        (dict(rank_by="weighted"), "one weight per reward"),
        (dict(pairs="all"), "--pairs"),
        (dict(captions="hybrid"), "--captioner"),
    ],
)
def test_bad_settings_raise_clear_errors(prompts_file, tmp_path, change, message):
    with pytest.raises(DiffalignError, match=message):
        lab.label(make_cfg(prompts_file, tmp_path / "x", **change), pipe=object())


def test_bad_prompt_files_and_nan_rewards(tiny_sd, tmp_path, monkeypatch):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DiffalignError, match="no prompts"):
        lab.read_prompts(str(empty))
    with pytest.raises(DiffalignError, match="not found"):
        lab.read_prompts(str(tmp_path / "missing.txt"))
    with pytest.raises(DiffalignError, match="NaN"):
        lab.rank_images({"r": [0.1, float("nan")]}, "avg-rank", None)
    one = tmp_path / "one.txt"
    one.write_text("a red circle\n")
    register_reward("test-flaky", lambda images, prompts: torch.zeros(1), overwrite=True)
    with pytest.raises(DiffalignError, match="1 scores for 3 images"):
        lab.label(make_cfg(one, tmp_path / "y", rewards=["test-flaky"]), pipe=tiny_sd)
    # "module:function" rewards are plain callables: label checks their output itself.
    (tmp_path / "my_rewards.py").write_text("import torch\ndef short(images, prompts):\n    return torch.zeros(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(DiffalignError, match="one score per image"):
        lab.label(make_cfg(one, tmp_path / "z", rewards=["my_rewards:short"]), pipe=tiny_sd)
    with pytest.raises(DiffalignError, match="module:function"):
        lab.label(make_cfg(one, tmp_path / "w", rewards=["my_rewards:missing"]), pipe=tiny_sd)


def test_a_model_folders_sampling_settings_apply_unless_flags_override_them(prompts_file, tmp_path, monkeypatch):
    import torch

    import diffalign.sampler

    seen = []

    def generate(pipe, prompts, *, seeds, **kwargs):
        seen.append(kwargs)
        return torch.zeros(len(prompts), 3, 8, 8)

    monkeypatch.setattr(diffalign.sampler, "generate", generate)
    # toy-sd ships diffalign.json (20 steps, guidance 4), as eval reads it: not the pipeline's 50 / 7.5
    lab.generate_images(None, ["a"], [0], make_cfg(prompts_file, tmp_path, model="toy-sd", num_inference_steps=None,
                                                   guidance_scale=None, resolution=None))
    lab.generate_images(None, ["a"], [0], make_cfg(prompts_file, tmp_path, model="toy-sd"))
    assert seen[0] == {"num_inference_steps": 20, "guidance_scale": 4.0}
    assert seen[1] == {"num_inference_steps": 2, "guidance_scale": 3.0, "height": 32, "width": 32}
