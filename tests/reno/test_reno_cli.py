"""`diffalign reno` writes the images, history.json, the plot and a summary; bad input exits 2."""

import json
import sys
import types

import pytest
import torch
from PIL import Image

from diffalign.cli import main


@pytest.fixture()
def user_reward_module(monkeypatch):
    """A user's reward module, importable as reno_user_rewards:redness."""
    module = types.ModuleType("reno_user_rewards")

    def redness(images, prompts):
        return images[:, 0].mean(dim=(1, 2)) - images[:, 2].mean(dim=(1, 2))

    module.redness = redness
    monkeypatch.setitem(sys.modules, "reno_user_rewards", module)
    return module


def test_cli_writes_images_history_plot_and_summary(turbo_sd, tmp_path, user_reward_module):
    model_dir = tmp_path / "tiny-sd"
    turbo_sd.save_pretrained(model_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue cube\n\n")
    out = tmp_path / "out"
    rc = main([
        "reno", "--model", str(model_dir), "--prompt", "a red apple", "--prompts", str(prompts),
        "--reward", "reno_user_rewards:redness=100", "--iterations", "3", "--device", "cpu", "--output-dir", str(out),
    ])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [s["prompt"] for s in summary] == ["a red apple", "a blue cube"]
    for entry in summary:
        folder = out / entry["folder"]
        record = json.loads((folder / "history.json").read_text())
        assert len(record["history"]) == 3
        assert set(record["history"][0]["rewards"]) == {"redness"}
        assert record["best_reward"] == max(h["total"] for h in record["history"]) == entry["best_reward"]
        assert record["history"][0]["total"] == pytest.approx(100 * record["history"][0]["rewards"]["redness"])
        for name in ("initial.png", "optimized.png"):
            assert Image.open(folder / name).size == (32, 32)
        assert Image.open(folder / "rewards.png").size[0] > 100
        # The saved latent regenerates the saved image (up to 8-bit rounding).
        latent = torch.load(folder / "latent.pt")["latent"]
        with torch.no_grad():
            image = turbo_sd(entry["prompt"], latents=latent, num_inference_steps=1, guidance_scale=0.0,
                            output_type="pt").images[0]
        saved = torch.tensor(__import__("numpy").array(Image.open(folder / "optimized.png"))).permute(2, 0, 1)
        assert (image * 255 - saved.float()).abs().max() <= 1.0


def test_cli_reports_bad_input_on_one_line(tmp_path, capsys):
    rc = main(["reno", "--model", "x", "--prompt", "p", "--iterations", "0", "--output-dir", str(tmp_path)])
    assert rc == 2
    assert "iterations=0" in capsys.readouterr().err
    rc = main(["reno", "--model", "x", "--prompt", "p", "--reward", "hpsv9=1", "--output-dir", str(tmp_path)])
    assert rc == 2
    assert "unknown reward 'hpsv9'" in capsys.readouterr().err


def test_a_many_step_model_runs_at_its_own_steps_unless_flags_say_otherwise(tmp_path, turbo_sd, monkeypatch, capsys):
    """toy-sd ships 20 steps at guidance 4 (diffalign.json): one step of it optimised pure noise."""
    import diffalign.reno as reno

    calls = []

    def fake_optimize(pipe, prompt, rewards, **kw):
        calls.append((kw["num_inference_steps"], kw["guidance_scale"]))
        image = torch.zeros(3, 8, 8)
        return reno.RenoResult(image, torch.zeros(1, 4, 1, 1), 0, image, torch.zeros(1, 4, 1, 1),
                               [{"iteration": 0, "total": 0.0, "rewards": {"toy-reward": 0.0}}])

    monkeypatch.setattr(reno, "optimize", fake_optimize)
    monkeypatch.setattr(reno, "load_pipeline", lambda *a, **k: None)
    turbo_sd.save_pretrained(tmp_path / "turbo")  # no diffalign.json: ReNO's one-step defaults
    for extra, expected in ((["--model", "toy-sd"], (20, 4.0)),
                            (["--model", "toy-sd", "--num-inference-steps", "4", "--guidance-scale", "0"], (4, 0.0)),
                            (["--model", str(tmp_path / "turbo")], (1, 0.0))):
        assert main(["reno", *extra, "--prompt", "p", "--reward", "toy-reward", "--output-dir", str(tmp_path / "o")]) == 0
        assert calls[-1] == expected, extra
        assert f"{expected[0]} sampler steps, guidance {expected[1]:g}" in capsys.readouterr().out
        settings = json.loads((tmp_path / "o" / "000" / "history.json").read_text())["settings"]
        assert settings["num_inference_steps"] == str(expected[0])  # the record says what ran
    assert main(["reno", "--model", "toy-sd", "--num-inference-steps", "0", "--prompt", "p", "--reward", "toy-reward",
                 "--output-dir", str(tmp_path / "o")]) == 2
    assert "use at least 1 step" in capsys.readouterr().err
