"""Every bad input of `diffalign train` a user can make, through the CLI: exit status 2, one line
on stderr starting "diffalign: error:", no traceback, and nothing lost (the folder's weights and
checkpoints stay as they were). Where the input alone decides, it fails before any model loads.

Covered elsewhere (not repeated here):
- the config values' messages, through `train()`: tests/config/test_config.py
  (test_bad_values_fail_in_one_line_before_any_model_loads); here the same inputs through the CLI;
- disk full while a checkpoint is written: tests/train/test_train_loop.py
  (test_full_disk_during_a_checkpoint_keeps_the_last_one_and_resume_finishes);
- a NaN loss keeps the last good step: test_train_loop.py (test_non_finite_loss_stops_...);
- a folder holds one run, resume with another lr / lora rank / method through `train()`, stale
  locks: test_train_loop.py (test_a_folder_holds_one_run, test_a_second_run_on_a_locked_folder_...);
- an empty or unreadable parquet, a 16-bit PNG: tests/data/test_data.py
  (test_an_empty_parquet_fails_in_one_line, test_a_16_bit_png_is_scaled_not_clipped_to_white);
- dcpo on pairs without per-image captions: tests/train/test_dcpo_train.py
  (test_dcpo_on_pairs_without_captions_fails_before_training);
- `diffalign reno --model toy-sd` runs at the model's own 20 steps: tests/reno/test_reno_cli.py
  (test_a_many_step_model_runs_at_its_own_steps_unless_flags_say_otherwise).
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import png, write_jsonl, write_parquet

from diffalign.cli import main

ROOT = Path(__file__).resolve().parents[2]


def fails_in_one_line(argv, capsys, expected):
    """Run the CLI: exit 2, stderr one line "diffalign: error: ..." holding `expected`, no traceback."""
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("diffalign: error:")]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err
    return lines[0]


def train_argv(model, data, out, *extra):
    return ["train", "--model", str(model), "--dataset", str(data), "--output-dir", str(out), "--resolution", "32",
            "--batch-size", "2", "--max-steps", "2", "--lr", "1e-3", "--lora-rank", "4", "--checkpoint-every", "0",
            *extra]


def weights(out):
    return (Path(out) / "pytorch_lora_weights.safetensors").read_bytes()


# Inputs the config alone decides: one line, before any model loads (the model does not exist).
CONFIG_ROWS = [
    (["--batch-size", "0"], "--batch-size 0 is too small"),
    (["--grad-accum", "0"], "--grad-accum 0 is too small"),
    (["--lr", "-1"], "--lr -1.0 must be a positive learning rate"),
    (["--mixed-precision", "fp8"], "mixed_precision 'fp8' is not valid: choose one of no, fp16, bf16"),
    (["--resolution", "17"], "--resolution 17 is not a positive multiple of 8"),
    (["--beta", "-1"], "dpo option beta=-1.0 must be a positive number"),
    (["--objective", "loss_type=cpo"], "dpo option loss_type='cpo' is not valid"),
]


@pytest.mark.parametrize("extra, expected", CONFIG_ROWS + [
    (["--eval-prompts", "toy", "--eval-rewards", "pickscor"], "unknown reward 'pickscor'"),
])
def test_config_values_fail_in_one_line_before_any_model_loads(extra, expected, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["train", "--model", str(tmp_path / "no-model"), "--dataset", str(tmp_path / "none.parquet"),
            "--output-dir", str(out), *extra]
    fails_in_one_line(argv, capsys, expected)
    assert not out.exists()


def test_argument_errors_report_before_torch_loads(tmp_path):
    """`import torch` takes seconds: a bad argument is reported without it."""
    cases = [argv for argv, _ in CONFIG_ROWS]
    script = (
        "import sys, json\n"
        "from diffalign.cli import main\n"
        f"codes = [main(['train', '--model', 'x', '--dataset', 'y', '--output-dir', {str(tmp_path / 'o')!r}] + a) "
        f"for a in {cases!r}]\n"
        "print(json.dumps({'codes': codes, 'torch': 'torch' in sys.modules}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"codes": [2] * len(cases), "torch": False}, proc.stderr
    assert proc.stderr.count("diffalign: error:") == len(cases) and "Traceback" not in proc.stderr
    # `python -m diffalign.cli train --batch-size 0 ...`, as a user runs it (runpy is what -m does).
    argv = ["diffalign", "train", "--batch-size", "0", "--model", "x", "--dataset", "y", "--output-dir", str(tmp_path / "o")]
    script = (
        "import runpy, sys\n"
        f"sys.argv = {argv!r}\n"
        "try:\n"
        "    runpy.run_module('diffalign.cli', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as stop:\n"
        "    print(stop.code, 'torch' in sys.modules, 'diffalign.objectives.dpo' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.stdout.split() == ["2", "False", "True"], proc.stderr
    assert proc.stderr == "diffalign: error: --batch-size 0 is too small: it must be at least 1\n"


def test_an_empty_parquet_is_one_line(tiny_sd_dir, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"caption": pa.array([], pa.string()), "jpg_0": pa.array([], pa.binary()),
                             "jpg_1": pa.array([], pa.binary()), "label_0": pa.array([], pa.float64())}), empty)
    fails_in_one_line(train_argv(tiny_sd_dir, empty, tmp_path / "out"), capsys, "has no rows")


def test_another_lora_rank_method_or_max_steps_on_resume_is_refused(tiny_sd_dir, pairs_parquet, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(tiny_sd_dir, pairs_parquet, out, "--checkpoint-every", "2")) == 0
    before = weights(out)
    checkpoint = sorted(p.name for p in (out / "checkpoints").iterdir())
    cases = [
        (["--resume", "latest", "--lora-rank", "8"], "its lora_rank is 4, this run's is 8"),
        (["--resume", "latest", "--method", "mapo"], "its method is 'dpo', this run's is 'mapo'"),
        (["--resume", "latest", "--lr", "5e-3"], "its lr is 0.001, this run's is 0.005"),
        (["--method", "mapo"], "holds another run: its method is 'dpo'"),  # no --resume: not a silent resume
    ]
    for extra, expected in cases:
        fails_in_one_line(train_argv(tiny_sd_dir, pairs_parquet, out, "--checkpoint-every", "2", *extra), capsys, expected)
    argv = train_argv(tiny_sd_dir, pairs_parquet, out, "--checkpoint-every", "2", "--resume", "latest")
    argv[argv.index("--max-steps") + 1] = "1"
    fails_in_one_line(argv, capsys, "--max-steps 1 is below the checkpoint's step 2")
    assert weights(out) == before and sorted(p.name for p in (out / "checkpoints").iterdir()) == checkpoint
    assert not (out / ".lock").exists()


def test_two_runs_on_one_folder(tiny_sd_dir, pairs_parquet, tmp_path, capsys):
    from diffalign.checkpoint import RunLock

    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out):  # a live run holds the folder (this process)
        fails_in_one_line(train_argv(tiny_sd_dir, pairs_parquet, out), capsys,
                          f"is in use by another diffalign run (pid {os.getpid()})")
    assert not (out / "metrics.jsonl").exists()
    assert main(train_argv(tiny_sd_dir, pairs_parquet, out)) == 0
    before = weights(out)
    argv = train_argv(tiny_sd_dir, pairs_parquet, out)
    argv[argv.index("--lr") + 1] = "2e-3"  # a new run into the old run's folder
    fails_in_one_line(argv, capsys, "holds another run: its lr is 0.001, this run's is 0.002")
    assert weights(out) == before


def test_strict_abort_mid_run_keeps_the_last_good_step(tiny_sd_dir, tmp_path, capsys):
    """A corrupt image met at step 3 under --strict: one line, and checkpoint-2 holds steps 1-2."""
    from diffalign.train import GroupOrder

    order = GroupOrder(6, 0, 0, 0, 1, 1).indices()  # the rows steps 1, 2, 3, ... read (batch 1, seed 0)
    rows = [{"caption": f"square {i}", "jpg_0": png((200, 30 * i, 30)), "jpg_1": png((30, 30 * i, 200)),
             "label_0": 1.0, "label_1": 0.0} for i in range(6)]
    rows[order[2]]["jpg_1"] = b"\x89PNG\r\n\x1a\n not an image"
    data = write_parquet(tmp_path / "bad.parquet", rows)
    out = tmp_path / "run"
    argv = train_argv(tiny_sd_dir, data, out, "--strict", "--max-steps", "5")
    argv[argv.index("--batch-size") + 1] = "1"
    line = fails_in_one_line(argv, capsys, "corrupt image")
    assert "checkpoint-2" in line and "--resume latest" in line
    assert (out / "checkpoints" / "checkpoint-2" / "trainable_0.safetensors").is_file()
    assert json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())["step"] == 2
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_rankdpo_on_all_ties_warns(tiny_sd_dir, tmp_path):
    from helpers import write_image

    lists = [{"prompt": f"shape {i}", "images": [write_image(tmp_path / f"{i}-{k}.png", 3 * i + k, (32, 32)) for k in range(3)],
              "scores": [0.5, 0.5, 0.5]} for i in range(2)]
    data = write_jsonl(tmp_path / "ties.jsonl", lists)
    argv = train_argv(tiny_sd_dir, data, tmp_path / "run", "--method", "rankdpo", "--max-steps", "1")
    argv[argv.index("--batch-size") + 1] = "1"
    with pytest.warns(UserWarning, match="are all ties .*learns nothing from a tie"):
        assert main(argv) == 0


def test_a_toy_model_trains_at_its_own_resolution_and_says_so(pairs_parquet, tmp_path, capsys):
    """toy-sd is built for 32 px: with no --resolution it trains there (not at 512), and the banner says so."""
    argv = train_argv("toy-sd", pairs_parquet, tmp_path / "run", "--max-steps", "1")
    del argv[argv.index("--resolution"):argv.index("--resolution") + 2]
    assert main(argv) == 0
    assert ", 32 px," in capsys.readouterr().out


def test_eval_lora_typo_fails_before_the_baseline_is_drawn(tiny_sd_dir, tmp_path, capsys, monkeypatch):
    import diffalign.evaluate as ev

    monkeypatch.setattr(ev, "generate", lambda *a, **k: pytest.fail("the baseline was drawn"))
    fails_in_one_line(["eval", "--model", tiny_sd_dir, "--lora", str(tmp_path / "lroa"), "--reward", "toy-reward",
                       "--output-dir", str(tmp_path / "ev")], capsys, "not found")


# ------------------------------------------------------------------ full disk after training


def test_a_full_disk_for_the_final_weights_keeps_the_checkpoint(tiny_sd_dir, pairs_parquet, tmp_path, capsys,
                                                                monkeypatch):
    """The final LoRA file fails half written: one line naming the checkpoint and the space, no partial file;
    freeing space and resuming writes the weights."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def full_disk(tensors, filename, metadata=None):
        if str(filename).endswith("pytorch_lora_weights.safetensors"):
            Path(filename).write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    out = tmp_path / "run"
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    line = fails_in_one_line(train_argv(tiny_sd_dir, pairs_parquet, out, "--checkpoint-every", "2"), capsys,
                             "could not write the final weights")
    assert "No space left on device" in line and "checkpoint-2" in line and "free at least" in line
    assert "KiB" in line and "--resume latest" in line
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")] and not (out / ".lock").exists()
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert main(train_argv(tiny_sd_dir, pairs_parquet, out, "--checkpoint-every", "2", "--resume", "latest")) == 0
    from diffalign.edges import file_mode

    # Weights and checkpoints take the user's umask (safetensors alone writes 0600).
    for path in (out / "pytorch_lora_weights.safetensors", out / "checkpoints" / "checkpoint-2" / "trainable_0.safetensors"):
        assert os.stat(path).st_mode & 0o777 == file_mode(), path


def test_a_full_disk_for_the_eval_outputs_is_one_line(tiny_sd_dir, tmp_path, capsys, monkeypatch):
    import diffalign.edges as edges

    real = edges.os.fsync
    calls = {"n": 0}

    def fsync(fd):  # the grid, the third file, hits the full disk
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(edges.os, "fsync", fsync)
    out = tmp_path / "ev"
    line = fails_in_one_line(["eval", "--model", tiny_sd_dir, "--baseline", tiny_sd_dir, "--reward", "toy-reward",
                              "--prompts", str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a red square"}])),
                              "--num-images", "1", "--num-inference-steps", "2", "--no-baseline-cache",
                              "--output-dir", str(out)], capsys, "could not write the evaluation file")
    assert "grid.png (No space left on device)" in line and "written: eval.json, scores.jsonl" in line
    assert "the rest (grid.png) needs" in line
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "scores.jsonl"]  # no temporary file left


# ------------------------------------------------------------------ files a user can read


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_weights_and_outputs_take_the_users_umask(umask, tiny_sd, tmp_path):
    """safetensors saves through tempfile (mode 0600): diffalign's files take the user's umask."""
    import copy

    from diffalign.edges import atomic_write_text
    from diffalign.models.lora import add_lora, save_lora

    old = os.umask(umask)
    try:
        unet = copy.deepcopy(tiny_sd.unet)
        add_lora(unet, rank=2, alpha=2, target_modules=None, family="sd")
        lora = save_lora(unet, tmp_path / "lora", "sd")
        text = atomic_write_text(tmp_path / "eval.json", "{}")
    finally:
        os.umask(old)
    assert lora == tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    for path in (lora, text):
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask, path
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == ["pytorch_lora_weights.safetensors"]
