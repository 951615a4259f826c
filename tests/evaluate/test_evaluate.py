"""diffalign eval: the win-rate statistics on known inputs, and a tiny end-to-end run."""

import json
import math
import random

import pytest
import torch

from diffalign.errors import DiffalignError
from diffalign.evaluate import (
    bootstrap_over_prompts, evaluate, gain_diagnostics, image_seeds, summarise, win_fractions, wilson_interval,
)


def test_wins_losses_and_ties_count_one_zero_half():
    assert win_fractions([2.0, 1.0, 3.0, 0.5], [1.0, 2.0, 3.0, 0.5]) == [1.0, 0.0, 0.5, 0.5]
    r = summarise([2.0, 1.0, 3.0, 0.5], [1.0, 2.0, 3.0, 0.5], prompt_ids=[0, 0, 1, 1])
    assert r["win_rate"] == pytest.approx(0.5) and r["ties"] == 2
    assert r["num_prompts"] == 2 and r["num_images"] == 4
    assert r["model"]["reward_mean"] == pytest.approx(1.625)
    assert r["baseline"]["reward_std"] == pytest.approx(torch.tensor([1.0, 2.0, 3.0, 0.5]).std().item())
    with pytest.raises(DiffalignError):
        win_fractions([1.0], [1.0, 2.0])


def test_gain_diagnostics_on_a_known_shift():
    # every twin gains exactly 1; both sides have population std sqrt(5): d = 1/sqrt(5)
    g = gain_diagnostics([2.0, 4.0, 6.0, 8.0], [1.0, 3.0, 5.0, 7.0])
    d = 1 / math.sqrt(5)
    assert g["mean_gain"] == pytest.approx(1.0) and g["effect_size_d"] == pytest.approx(d)
    # Φ(d/√2) from the normal CDF, computed independently
    assert g["independent_draw_win"] == pytest.approx(0.5 * math.erfc(-(d / math.sqrt(2)) / math.sqrt(2)))
    assert g["independent_draw_win"] == pytest.approx(0.6241, abs=1e-4)
    assert g["moved_share"] == 0.0  # a gain of 1 is under half of sqrt(5)
    # a re-draw: the same scores shuffled between twins -> no mean gain, most twins moved
    g = gain_diagnostics([8.0, 2.0, 6.0, 4.0], [2.0, 8.0, 4.0, 6.0])
    assert g["mean_gain"] == 0.0 and g["independent_draw_win"] == 0.5 and g["moved_share"] == 1.0
    assert summarise([2.0, 4.0], [1.0, 3.0], prompt_ids=[0, 1])["gain"]["mean_gain"] == pytest.approx(1.0)


def test_wilson_interval_matches_the_closed_form_values():
    # 60 of 100: the textbook Wilson 95% interval is (0.5020, 0.6906)
    lo, hi = wilson_interval(60, 100)
    assert lo == pytest.approx(0.5020, abs=1e-4) and hi == pytest.approx(0.6906, abs=1e-4)
    lo, hi = wilson_interval(10, 10)  # all wins: the upper end is 1, the lower end 10/(10+z^2)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(10 / (10 + 1.959964**2), abs=1e-6)


def test_bootstrap_is_degenerate_when_every_prompt_has_the_same_win_rate():
    wins = [1.0, 1.0, 1.0, 0.0] * 10  # each prompt wins 3 of its 4 images
    ids = [p for p in range(10) for _ in range(4)]
    assert bootstrap_over_prompts(wins, ids) == pytest.approx((0.75, 0.75))


def test_bootstrap_over_prompts_agrees_with_the_normal_approximation():
    # 400 prompts with 4 images each and a per-prompt win rate that varies: the bootstrap
    # interval should be close to mean +- 1.96 * sd(prompt means) / sqrt(P) (equal group sizes)
    rng = random.Random(1)
    wins, ids = [], []
    for p in range(400):
        q = rng.random()
        wins += [1.0 if rng.random() < q else 0.0 for _ in range(4)]
        ids += [p] * 4
    means = torch.tensor(wins).view(400, 4).mean(1)
    centre, half = means.mean().item(), 1.96 * means.std().item() / math.sqrt(400)
    lo, hi = bootstrap_over_prompts(wins, ids)
    assert lo == pytest.approx(centre - half, abs=0.01) and hi == pytest.approx(centre + half, abs=0.01)
    # it is wider than Wilson over images, which ignores that a prompt's images are correlated
    wl, wh = wilson_interval(sum(wins), len(wins))
    assert hi - lo > wh - wl


def test_seeds_are_shared_and_distinct():
    seeds = image_seeds(3, 2, 10)
    assert seeds == [10, 11, 12, 13, 14, 15]


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def test_tiny_eval_run_writes_eval_json_scores_and_grid(tmp_path):
    from PIL import Image

    from diffalign.testing import tiny_pipeline

    model, baseline = tiny_pipeline("sd", seed=0), tiny_pipeline("sd", seed=1)
    for pipe in (model, baseline):
        pipe.set_progress_bar_config(disable=True)
    results = evaluate(model, baseline, ["a red circle", "two blue squares"], [brightness], num_images=2, seed=3,
                       output_dir=tmp_path, num_inference_steps=2, guidance_scale=1.0, batch_size=3, verbose=False)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved == json.loads(json.dumps(results))
    entry = saved["rewards"]["brightness"]
    assert entry["num_prompts"] == 2 and entry["num_images"] == 4 and saved["seed"] == 3
    # the win rate is the share of same-seed twins the model wins, recomputed from scores.jsonl
    rows = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == [3, 4, 5, 6]
    twins = [(r["brightness"]["model"], r["brightness"]["baseline"]) for r in rows]
    expected = sum(1.0 if m > b else 0.0 if m < b else 0.5 for m, b in twins) / 4
    assert entry["win_rate"] == pytest.approx(expected)
    assert entry["win_rate_ci"][0] <= entry["win_rate"] <= entry["win_rate_ci"][1]
    assert entry["model"]["reward_mean"] == pytest.approx(sum(m for m, _ in twins) / 4, abs=1e-6)
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size[0] > grid.size[1] > 0

    # a model compared with itself ties everywhere: win rate exactly one half
    same = evaluate(model, model, ["a red circle"], [brightness], num_images=2, seed=3, output_dir=tmp_path / "same",
                    num_inference_steps=2, guidance_scale=1.0, verbose=False)
    assert same["rewards"]["brightness"]["win_rate"] == 0.5 and same["rewards"]["brightness"]["ties"] == 2


def test_eval_needs_something_to_compare(tmp_path):
    with pytest.raises(DiffalignError, match="--lora"):
        evaluate("toy-sd", None, ["x"], [brightness], num_images=1, seed=0, output_dir=tmp_path)


def test_lora_run_compares_against_the_same_model_without_it(tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from diffalign.testing import save_tiny_pipeline, tiny_pipeline

    base_dir = save_tiny_pipeline("sd", tmp_path / "base")
    pipe = tiny_pipeline("sd")
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():  # LoRA starts as a no-op (B = 0): give it an effect to measure
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet))

    r = evaluate(str(base_dir), None, ["a red circle"], [brightness], num_images=2, seed=0, output_dir=tmp_path / "ev",
                 lora=str(tmp_path / "lora"), num_inference_steps=2, guidance_scale=1.0, verbose=False)
    plain = evaluate(str(base_dir), str(base_dir), ["a red circle"], [brightness], num_images=2, seed=0,
                     output_dir=tmp_path / "plain", num_inference_steps=2, guidance_scale=1.0, verbose=False)
    lora_rows = [json.loads(x) for x in (tmp_path / "ev" / "scores.jsonl").read_text().splitlines()]
    plain_rows = [json.loads(x) for x in (tmp_path / "plain" / "scores.jsonl").read_text().splitlines()]
    # the baseline is exactly the model without the LoRA; the LoRA changes the images
    assert [x["brightness"]["baseline"] for x in lora_rows] == pytest.approx([x["brightness"]["model"] for x in plain_rows])
    assert r["rewards"]["brightness"]["ties"] == 0
    assert "without LoRA" in r["baseline"]


def test_baseline_images_are_cached_between_runs_and_redrawn_when_anything_changes(tmp_path, monkeypatch):
    import os

    import diffalign.evaluate as ev
    from diffalign.testing import save_tiny_pipeline, tiny_pipeline

    base_dir = save_tiny_pipeline("sd", tmp_path / "base")
    model = tiny_pipeline("sd", seed=1)
    model.set_progress_bar_config(disable=True)
    drawn = []
    real_generate = ev.generate
    monkeypatch.setattr(ev, "generate", lambda pipe, *a, **k: drawn.append(a[-1]) or real_generate(pipe, *a, **k))
    cache = tmp_path / "cache"

    def run(name, **kwargs):
        kwargs = {"seed": 0, "baseline_cache": cache, **kwargs}
        result = evaluate(model, str(base_dir), ["a red circle"], [brightness], num_images=2, output_dir=tmp_path / name,
                          num_inference_steps=2, guidance_scale=1.0, verbose=False, **kwargs)
        rows = [json.loads(x) for x in (tmp_path / name / "scores.jsonl").read_text().splitlines()]
        return result, [r["brightness"]["baseline"] for r in rows]

    first, first_scores = run("first")
    assert drawn == ["baseline", "model"] and first["baseline_images"] == "drawn"
    files = list((cache / "eval-baselines").glob("*.safetensors"))
    assert len(files) == 1
    drawn.clear()
    second, second_scores = run("second")  # same model files, prompts, seeds, settings: read back
    assert drawn == ["model"] and second["baseline_images"] == f"cache {files[0]}"
    assert second_scores == first_scores and second["rewards"] == first["rewards"]

    drawn.clear()
    run("off", baseline_cache=False)
    run("other-seed", seed=5)
    assert drawn == ["baseline", "model"] * 2
    drawn.clear()
    weights = next(base_dir.glob("unet/*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # an edited model
    run("edited")
    assert drawn == ["baseline", "model"] and len(list((cache / "eval-baselines").glob("*.safetensors"))) == 3

    drawn.clear()
    files[0].write_bytes(b"not a safetensors file")  # a damaged entry is drawn again, with a warning
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns - 10**9))
    with pytest.warns(UserWarning, match="unreadable"):
        _, again = run("damaged")
    assert drawn == ["baseline", "model"] and again == pytest.approx(first_scores)
    # a cache that cannot be written (here: its folder is a file) warns, and the evaluation goes on
    blocked = tmp_path / "blocked"
    blocked.write_text("")
    with pytest.warns(UserWarning, match="could not write the baseline cache"):
        _, unwritten = run("unwritable", baseline_cache=blocked)
    assert unwritten == pytest.approx(first_scores)
    # a pipeline object cannot be fingerprinted: never cached
    assert ev.model_fingerprint(model) is None and ev.model_fingerprint("some-org/some-hub-model") is None


class _Captured(list):
    """A logging handler that keeps the messages that reach diffusers' library logger."""

    def __enter__(self):
        import logging

        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.append(record.getMessage())
        logging.getLogger("diffusers").addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        import logging

        logging.getLogger("diffusers").removeHandler(self.handler)


def test_loading_a_denoiser_lora_gives_no_text_encoder_notice(tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from diffalign.evaluate import load_lora
    from diffalign.testing import tiny_pipeline

    pipe = tiny_pipeline("sd")
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    fresh = tiny_pipeline("sd")
    with _Captured() as messages:
        load_lora(fresh, str(tmp_path / "lora"))
    assert fresh.unet.peft_config  # the LoRA did load into the denoiser
    assert not [m for m in messages if m.startswith("No LoRA keys")]


def test_the_notice_about_the_denoiser_itself_is_kept():
    import logging

    from diffalign.evaluate import only_denoiser_lora_notices

    logger = logging.getLogger("diffusers.loaders.peft")
    with _Captured() as messages, only_denoiser_lora_notices("UNet2DConditionModel"):
        logger.warning("No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'.")
        logger.warning("No LoRA keys associated to UNet2DConditionModel found with the prefix='unet'.")
    assert messages == ["No LoRA keys associated to UNet2DConditionModel found with the prefix='unet'."]
    with _Captured() as after:  # the filter is gone once the load is over
        logger.warning("No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'.")
    assert len(after) == 1


def test_the_denoiser_is_the_unet_else_the_transformer_else_a_clear_error():
    from types import SimpleNamespace

    from diffalign.evaluate import pipeline_denoiser

    unet, transformer = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    assert pipeline_denoiser(SimpleNamespace(unet=unet, transformer=None)) is unet
    assert pipeline_denoiser(SimpleNamespace(unet=None, transformer=transformer)) is transformer
    assert pipeline_denoiser(SimpleNamespace(transformer=transformer)) is transformer
    with pytest.raises(DiffalignError, match="neither a unet nor a transformer"):
        pipeline_denoiser(SimpleNamespace(vae=unet))


def test_a_model_folders_sampling_settings_apply_unless_arguments_override_them(tmp_path, monkeypatch):
    import diffalign.evaluate as ev

    seen = []

    def fake_generate(pipe, prompts, seeds, batch_size, call_kwargs, desc):
        seen.append(dict(call_kwargs))
        return torch.zeros(len(prompts), 3, 8, 8, dtype=torch.uint8)

    monkeypatch.setattr(ev, "open_pipeline", lambda model, device, dtype: None)
    monkeypatch.setattr(ev, "generate", fake_generate)
    common = dict(num_images=1, seed=0, baseline_cache=False, verbose=False, device="cpu")
    evaluate("toy-sd", "toy-sd", ["a"], [brightness], output_dir=tmp_path / "a", **common)
    evaluate("toy-flow", "toy-flow", ["a"], [brightness], output_dir=tmp_path / "b", num_inference_steps=3,
             guidance_scale=1.5, **common)
    assert seen == [{"num_inference_steps": 20, "guidance_scale": 4.0}] * 2 + [{"num_inference_steps": 3, "guidance_scale": 1.5}] * 2
