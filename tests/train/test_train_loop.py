"""The training loop end to end on a tiny SD pipeline: outputs, resume, cache, bad input."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign.cli import main
from diffalign.config import TrainConfig
from diffalign.errors import DiffalignError
from diffalign.train import train
from helpers import cli_command, run_cli


def cfg_for(model, data, out, **kw):
    base = dict(method="dpo", model=model, dataset=data, output_dir=str(out), resolution=32, batch_size=2,
                max_steps=3, lr=1e-3, lora_rank=4, checkpoint_every=0, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def metrics(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_cli_run_writes_outputs_that_load_into_diffusers(tiny_sd_dir, pairs_parquet, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "run"
    code = main(["train", "--method", "dpo", "--model", tiny_sd_dir, "--dataset", pairs_parquet, "--output-dir", str(out),
                 "--max-steps", "3", "--batch-size", "2", "--resolution", "32", "--lr", "1e-3", "--lora-rank", "4"])
    assert code == 0
    for name in ("config.yaml", "metrics.jsonl", "training_curves.png", "pytorch_lora_weights.safetensors"):
        assert (out / name).is_file(), name
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    pipe = DiffusionPipeline.from_pretrained(tiny_sd_dir)
    x = torch.randn(1, 4, 16, 16)
    emb = torch.randn(1, 8, pipe.unet.config.cross_attention_dim)
    before = pipe.unet(x, 10, emb).sample
    pipe.load_lora_weights(str(out))
    after = pipe.unet(x, 10, emb).sample
    assert not torch.allclose(before, after)  # the trained LoRA changes the model


def test_resume_continues_exactly(tiny_sd_dir, pairs_parquet, tmp_path):
    full = tmp_path / "full"
    train(cfg_for(tiny_sd_dir, pairs_parquet, full, max_steps=4, checkpoint_every=2))
    part = tmp_path / "part"
    train(cfg_for(tiny_sd_dir, pairs_parquet, part, max_steps=2, checkpoint_every=2))
    train(cfg_for(tiny_sd_dir, pairs_parquet, part, max_steps=4, checkpoint_every=2, resume="latest"))
    a = load_file(str(full / "pytorch_lora_weights.safetensors"))
    b = load_file(str(part / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert [r["loss"] for r in metrics(full)][2:] == pytest.approx([r["loss"] for r in metrics(part)][2:], abs=1e-6)
    # Checkpoints hold only the trainable weights and are atomically renamed into place.
    ckpts = sorted((full / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["checkpoint-2", "checkpoint-4"]
    assert not list((full / "checkpoints").glob(".tmp-*"))
    trainable = load_file(str(ckpts[-1] / "trainable_0.safetensors"))
    assert trainable and all("lora" in k for k in trainable)


def test_cached_run_matches_uncached_without_the_vae(tiny_sd_dir, pairs_parquet, tmp_path):
    from diffusers import DiffusionPipeline

    plain = tmp_path / "plain"
    train(cfg_for(tiny_sd_dir, pairs_parquet, plain, max_steps=2))
    cached = tmp_path / "cached"
    cache_dir = tmp_path / "cache"
    # Build the cache, then train from it with a pipeline whose VAE and text encoder refuse to run.
    train(cfg_for(tiny_sd_dir, pairs_parquet, tmp_path / "warm", max_steps=1, cache_latents=True, cache_dir=str(cache_dir)))
    pipe = DiffusionPipeline.from_pretrained(tiny_sd_dir)

    def refuse(*args, **kwargs):
        raise AssertionError("the VAE/text encoder ran during cached training")

    pipe.vae.encode = refuse
    pipe.text_encoder.forward = refuse
    train(cfg_for(tiny_sd_dir, pairs_parquet, cached, max_steps=2, cache_latents=True, cache_dir=str(cache_dir)), pipeline=pipe)
    # The denoising errors agree to float rounding (VAE/text encoder batched differently);
    # beta = 5000 multiplies such rounding in the loss, hence its looser tolerance.
    for key, tol in (("model_err_w", 1e-5), ("model_err_l", 1e-5), ("ref_err_w", 1e-5), ("loss", 5e-4)):
        assert [r[key] for r in metrics(cached)] == pytest.approx([r[key] for r in metrics(plain)], abs=tol), key


def test_bad_inputs_get_one_line_errors(tiny_sd_dir, pairs_parquet, tmp_path, capsys):
    cases = [
        (["--method", "ppo"], "unknown method 'ppo'"),
        (["--method", "flow-dpo"], "does not serve 'epsilon'"),
        (["--method", "dpo", "--model", tiny_sd_dir], "--dataset is missing"),
        (["--method", "mapo", "--objective", "betta=1"], "has no option betta"),
    ]
    for extra, expected in cases:
        argv = ["train", "--output-dir", str(tmp_path / "x"), "--max-steps", "1", "--resolution", "32"] + extra
        if "--model" not in extra and extra[1] != "ppo":
            argv += ["--model", tiny_sd_dir, "--dataset", pairs_parquet]
        if extra[1] == "ppo":
            argv += ["--model", tiny_sd_dir, "--dataset", pairs_parquet]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) >= 1 and expected in err[-1] and "Traceback" not in "\n".join(err), (extra, err)


def test_unwritable_output_dir(tiny_sd_dir, pairs_parquet, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DiffalignError, match="cannot write to output folder"):
        train(cfg_for(tiny_sd_dir, pairs_parquet, blocker / "out"))


def make_loss_nan_at(monkeypatch, call: int) -> None:
    """DPO's loss turns NaN at its `call`-th call (one call a step here)."""
    from diffalign.objectives import dpo

    real = dpo.loss
    calls = {"n": 0}

    def flaky(err, ref_err, **kw):
        calls["n"] += 1
        losses, m = real(err, ref_err, **kw)
        return (losses * float("nan") if calls["n"] == call else losses), m

    monkeypatch.setattr(dpo, "loss", flaky)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_sd_dir, pairs_parquet, tmp_path, monkeypatch):
    make_loss_nan_at(monkeypatch, 3)
    out = tmp_path / "nan"
    with pytest.raises(DiffalignError, match="loss is nan at step 3.*checkpoint-2"):
        train(cfg_for(tiny_sd_dir, pairs_parquet, out, max_steps=5, log_every=1))
    assert (out / "checkpoints" / "checkpoint-2" / "trainable_0.safetensors").is_file()


def test_a_non_finite_loss_found_at_a_later_check_keeps_the_last_checkpoint(tiny_sd_dir, pairs_parquet, tmp_path,
                                                                           monkeypatch):
    """Losses reach the host every log_every steps and before each checkpoint: a NaN at step 5
    is found at the check of step 6, after its optimiser step; the weights in memory are not
    kept, the checkpoint of step 4 (checked before it was written) is."""
    from diffalign import step as step_module

    make_loss_nan_at(monkeypatch, 5)
    checks = []
    real_check = step_module.StepLog.first_non_finite
    monkeypatch.setattr(step_module.StepLog, "first_non_finite",
                        lambda self, step: checks.append(step) or real_check(self, step))
    out = tmp_path / "nan"
    with pytest.raises(DiffalignError, match=r"loss is nan at step 5: .*the last good checkpoint is .*checkpoint-4"):
        train(cfg_for(tiny_sd_dir, pairs_parquet, out, max_steps=8, log_every=3, checkpoint_every=4))
    assert checks == [3, 4, 6]  # log steps and the checkpoint's step; not every step
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-4"]
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5]  # the NaN step is logged; step 6 stopped before its update
    assert math.isnan(metrics(out)[4]["loss"])


def test_two_processes_match_one_with_the_same_global_batch(tiny_sd_dir, pairs_parquet, tmp_path):
    """Two processes (gloo on the CPU), batch 1 each == one process with batch 2; the two share
    the final evaluation and write what `diffalign eval` writes in one process."""
    one = tmp_path / "one"
    train(cfg_for(tiny_sd_dir, pairs_parquet, one, max_steps=2, batch_size=2))
    two = tmp_path / "two"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green ring\n")
    sampling = ["--num-inference-steps", "2", "--resolution", "32"]
    scored_by = tmp_path / "scored-by.txt"
    run_cli(cli_command(["train", "--model", tiny_sd_dir, "--dataset", pairs_parquet, "--output-dir", str(two),
                         "--max-steps", "2", "--batch-size", "1", "--lr", "1e-3", "--lora-rank", "4",
                         "--checkpoint-every", "0", "--eval-prompts", str(prompts), "--eval-rewards",
                         "helpers:brightness_noting_the_process", "--eval-num-images", "3", "--no-eval-baseline-cache",
                         *sampling], 2), env={"SCORED_BY": str(scored_by)})
    assert set(scored_by.read_text().split()) == {"0", "1"}  # 9 images a model in batches of 8: one each
    run_cli(cli_command(["eval", "--model", tiny_sd_dir, "--lora", str(two), "--prompts", str(prompts), "--reward",
                         "helpers:brightness_noting_the_process", "--num-images", "3", "--seed", "0",
                         "--no-baseline-cache", "--output-dir", str(tmp_path / "eval-one"),
                         *sampling]), env={"SCORED_BY": str(tmp_path / "scored-alone.txt")})
    shared, alone = (json.loads((d / "eval.json").read_text()) for d in (two / "eval", tmp_path / "eval-one"))
    assert shared["num_images"] == 9 and shared["rewards"] == alone["rewards"]
    assert (two / "eval" / "scores.jsonl").read_text() == (tmp_path / "eval-one" / "scores.jsonl").read_text()
    # Same groups, noise and timesteps on both sides: the errors agree to float rounding (the
    # gradient all-reduce sums in another order); beta = 5000 magnifies that rounding in the loss.
    for key, tol in (("model_err_w", 1e-5), ("model_err_l", 1e-5), ("loss", 1e-3)):
        assert [r[key] for r in metrics(two)] == pytest.approx([r[key] for r in metrics(one)], abs=tol), key
    a = load_file(str(one / "pytorch_lora_weights.safetensors"))
    b = load_file(str(two / "pytorch_lora_weights.safetensors"))
    # Adam's second step divides the momentum by sqrt(v): where the two steps' gradients nearly
    # cancel, the all-reduce's rounding is magnified, so the weights agree to a tenth of one step
    # (lr 1e-3); training on other groups or noise moves them by whole steps.
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)


def test_streaming_run_resumes_exactly(tiny_sd_dir, pairs_parquet, tmp_path):
    full = tmp_path / "full"
    train(cfg_for(tiny_sd_dir, pairs_parquet, full, max_steps=3, streaming=True, batch_size=1))
    part = tmp_path / "part"
    train(cfg_for(tiny_sd_dir, pairs_parquet, part, max_steps=1, streaming=True, batch_size=1, checkpoint_every=1))
    train(cfg_for(tiny_sd_dir, pairs_parquet, part, max_steps=3, streaming=True, batch_size=1, resume="latest"))
    a = load_file(str(full / "pytorch_lora_weights.safetensors"))
    b = load_file(str(part / "pytorch_lora_weights.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_sigterm_writes_a_checkpoint_and_resume_finishes(tiny_sd_dir, pairs_parquet, tmp_path, monkeypatch):
    import os
    import signal

    from diffalign.objectives import dpo

    real = dpo.loss
    calls = {"n": 0}

    def loss_then_sigterm(err, ref_err, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # a real SIGTERM during step 2, as a cluster scheduler sends it
            os.kill(os.getpid(), signal.SIGTERM)
        return real(err, ref_err, **kw)

    monkeypatch.setattr(dpo, "loss", loss_then_sigterm)
    out = tmp_path / "term"
    result = train(cfg_for(tiny_sd_dir, pairs_parquet, out, max_steps=4))
    assert result == {"interrupted": True, "step": 2}
    assert (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    monkeypatch.setattr(dpo, "loss", real)
    train(cfg_for(tiny_sd_dir, pairs_parquet, out, max_steps=4, resume="latest"))
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]


def test_validation_grid_and_ema(tiny_sd_dir, pairs_parquet, tmp_path):
    out = tmp_path / "val"
    train(cfg_for(tiny_sd_dir, pairs_parquet, out, max_steps=2, validation_every=2, validation_prompts=["a red square"],
                  num_inference_steps=2, ema=True))
    assert (out / "validation" / "step-000002.png").is_file()
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_a_folder_holds_one_run(tiny_sd_dir, pairs_parquet, tmp_path):
    """Another run into a used folder, or a resume with other settings, fails before any model loads."""
    out = tmp_path / "run"
    train(cfg_for(tiny_sd_dir, pairs_parquet, out, max_steps=2, checkpoint_every=2))
    before = (out / "pytorch_lora_weights.safetensors").read_bytes()
    for change, key in ((dict(method="mapo"), "method"), (dict(lora_rank=8), "lora_rank"), (dict(lr=5e-3), "lr")):
        for resume in (None, "latest"):
            with pytest.raises(DiffalignError, match=f"holds another run: its {key} is"):
                train(cfg_for(tiny_sd_dir, pairs_parquet, out, max_steps=4, resume=resume, **change))
    with pytest.raises(DiffalignError, match="--max-steps 1 is below the checkpoint's step 2"):
        train(cfg_for(tiny_sd_dir, pairs_parquet, out, max_steps=1, resume="latest"))
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == before  # nothing lost
    assert not (out / ".lock").exists()


def test_a_second_run_on_a_locked_folder_refuses_and_a_stale_lock_is_taken_over(tmp_path):
    import os
    import socket

    from diffalign.checkpoint import RunLock

    with RunLock(tmp_path):
        with pytest.raises(DiffalignError, match=f"in use by another diffalign run \\(pid {os.getpid()}\\)"):
            RunLock(tmp_path).__enter__()
    assert not (tmp_path / ".lock").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    with pytest.warns(UserWarning, match="is gone"), RunLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_full_disk_during_a_checkpoint_keeps_the_last_one_and_resume_finishes(tiny_sd_dir, pairs_parquet, tmp_path,
                                                                             monkeypatch):
    """torch's writer fails mid-checkpoint: one line naming the kept checkpoint, no partial folder, exact resume."""
    from accelerate import Accelerator

    full = tmp_path / "full"
    train(cfg_for(tiny_sd_dir, pairs_parquet, full, max_steps=4, checkpoint_every=2))
    out = tmp_path / "run"
    real = Accelerator.save_state

    def save_state(self, output_dir=None, **kw):
        if "checkpoint-4" in str(output_dir):
            (Path(output_dir)).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "partial.bin").write_bytes(b"x" * 1000)
            raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file data/3: file write failed")
        return real(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    with pytest.raises(DiffalignError, match="could not write checkpoint .*checkpoint-4 .*the last complete checkpoint is .*checkpoint-2: free at least"):
        train(cfg_for(tiny_sd_dir, pairs_parquet, out, max_steps=4, checkpoint_every=2))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert not (out / ".lock").exists()
    monkeypatch.setattr(Accelerator, "save_state", real)
    train(cfg_for(tiny_sd_dir, pairs_parquet, out, max_steps=4, checkpoint_every=2, resume="latest"))
    a, b = load_file(str(full / "pytorch_lora_weights.safetensors")), load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
