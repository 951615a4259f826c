"""diffalign's Diffusion-DPO step against the diffusers research script, side by side.

The diffusers script (examples/research_projects/diffusion_dpo/train_diffusion_dpo.py) is not
in the diffusers wheel: fetch it from the diffusers repository and give its path.

    git clone --depth 1 https://github.com/huggingface/diffusers /tmp/diffusers
    OMP_NUM_THREADS=1 python benchmarks/bench_vs_diffusers.py \
        --script /tmp/diffusers/examples/research_projects/diffusion_dpo/train_diffusion_dpo.py

Both train the same tiny Stable Diffusion (diffalign.testing's, saved to a folder the script
loads with from_pretrained) on the same Pick-a-Pic-schema parquet (JPEG pairs, no ties), batch
4 pairs, LoRA rank 8 on to_q/to_k/to_v/to_out.0, 32 px, centre crop, no flip, fp32, one
process. Each run is a fresh process; a global optimiser-step hook records the time of every
optimiser step, so the same clock measures both: pairs/s = batch * steps / (time of the last
step - time of the step that ends the warm-up). Rows:

  diffusers         the script, through its own CLI only (unedited; when wandb is not
                    installed an empty module stands in for it: the script imports it and
                    only uses it for validation images, which are off here)
  diffalign         `diffalign train --method dpo` on the same folder and parquet
  diffalign cached  the same with `--cache-latents` (the cache is built before the timed steps)

`--profile` adds a cProfile of diffalign's uncached steps (`--profile-row "diffalign cached"`: the cached
ones), the top functions by cumulative time.

`--scale real` does the same at real size on a GPU: an SD1.5 (or, with `--model sdxl` and the
script's SDXL twin train_diffusion_dpo_sdxl.py, an SDXL) pipeline with random weights built from
its config, native resolution, and the flags both take (`--mixed-precision`,
`--gradient-checkpointing`). MFU = the FLOPs one step must do (policy forward and backward and
the reference forward on the step's images, counted by torch's FlopCounterMode on the meta
device; gradient checkpointing's recomputation not counted) / step time / `--peak-tflops`:

    python benchmarks/bench_vs_diffusers.py --scale real --mixed-precision bf16 --gradient-checkpointing \
        --script /tmp/diffusers/examples/research_projects/diffusion_dpo/train_diffusion_dpo.py
"""

from __future__ import annotations

import argparse
import io
import json
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star", "cross", "ring"]


# --------------------------------------------------------------------------- the shared inputs
TINY_FAMILY = {"sd15": "sd", "sdxl": "sdxl"}  # --model at --scale tiny: diffalign.testing's family


def build_model(root: Path, scale: str, name: str) -> Path:
    """The pipeline folder both trainers load: diffalign.testing's tiny SD, or a real-size one
    with random weights (bench_train's configs), saved in bf16 to halve the writing."""
    import torch

    if scale == "tiny":
        from diffalign.testing import save_tiny_pipeline

        return save_tiny_pipeline(TINY_FAMILY[name], root / f"tiny-{name}")
    from bench_train import real_pipeline  # benchmarks/ is on sys.path when this script runs

    from diffalign.rewards.clip_tokenizer import write_clip_tokenizer

    folder = root / name
    if not (folder / "model_index.json").exists():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):  # random initialisation on the GPU: seconds, not minutes
            pipe, _ = real_pipeline(name, str(write_clip_tokenizer(root / "tokenizer")))
        pipe.to(torch.bfloat16).save_pretrained(folder)
    return folder


def step_flops(scale: str, name: str, pairs: int, resolution: int, rank: int) -> float:
    """The FLOPs of one DPO step (policy forward + backward, reference forward, B*2 images),
    counted on the meta device: no memory, no weights, the same shapes."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from diffalign.models import load_adapter
    from diffalign.models.lora import add_lora, reference

    with torch.device("meta"):
        if scale == "tiny":
            from diffalign.testing import tiny_pipeline

            pipe = tiny_pipeline(TINY_FAMILY[name])
        else:
            from bench_train import real_pipeline

            from diffalign.rewards.clip_tokenizer import write_clip_tokenizer

            pipe, _ = real_pipeline(name, str(write_clip_tokenizer(tempfile.mkdtemp())))
    adapter = load_adapter(pipe, device="meta")
    add_lora(adapter.denoiser, rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    images = 2 * pairs
    cond = adapter.encode_prompts(["a prompt"] * images)
    latents = torch.randn(images, *adapter.latent_shape(resolution, resolution), device="meta")
    timesteps = torch.zeros(images, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        adapter.predict(adapter.denoiser, latents, timesteps, cond).float().pow(2).mean().backward()
        with reference(adapter.denoiser) as ref:
            adapter.predict(ref, latents, timesteps, cond)
    return counter.get_total_flops()


def build_data(root: Path, rows: int, image_size: int) -> Path:
    """A Pick-a-Pic-schema parquet (JPEG bytes, label_0 1 or 0)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)

    def jpeg() -> bytes:
        # A smooth random picture (a JPEG of white noise is not what real data looks like).
        small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        picture = Image.fromarray(small).resize((image_size, image_size), Image.BICUBIC)
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()

    records = []
    for i in range(rows):
        label = float(i % 2)
        caption = f"a {COLOURS[i % 8]} {SHAPES[(i // 8) % 6]} beside a {COLOURS[(i // 48) % 8]} {SHAPES[i % 6]}, picture {i}"
        records.append({"caption": caption, "jpg_0": jpeg(), "jpg_1": jpeg(), "label_0": label, "label_1": 1.0 - label})
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), data / "train.parquet")
    return data


def diffusers_command(script: str, model: Path, data: Path, out: Path, args) -> list[str]:
    return [script, "--pretrained_model_name_or_path", str(model), "--dataset_name", str(data),
            "--dataset_split_name", "train", "--output_dir", str(out), "--resolution", str(args.resolution),
            "--train_batch_size", str(args.batch_size), "--rank", str(args.rank),
            "--max_train_steps", str(args.warmup + args.steps), "--checkpointing_steps", "100000",
            "--learning_rate", "1e-5", "--beta_dpo", "5000", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--no_hflip", "--seed", "0", "--report_to", "tensorboard", "--vae_encode_batch_size", "8",
            "--mixed_precision", args.mixed_precision] + (["--gradient_checkpointing"] if args.gradient_checkpointing else [])


def diffalign_command(model: Path, data: Path, out: Path, args, cached: bool) -> list[str]:
    cmd = ["train", "--method", "dpo", "--model", str(model), "--dataset", str(data / "train.parquet"),
           "--output-dir", str(out), "--resolution", str(args.resolution), "--batch-size", str(args.batch_size),
           "--lora-rank", str(args.rank), "--max-steps", str(args.warmup + args.steps), "--checkpoint-every", "0",
           "--lr", "1e-5", "--beta", "5000", "--lr-scheduler", "constant", "--seed", "0",
           "--mixed-precision", args.mixed_precision]
    cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    return cmd + (["--cache-latents"] if cached else []) + args.diffalign_extra


# --------------------------------------------------------------------------- one timed run
def child(stamps_file: str, target: str, argv: list[str], profile: str | None) -> None:
    """Run `target` (a script path, or -m MODULE) with `argv`, recording every optimiser step's time."""
    import types

    import torch

    stamps: list[float] = []
    from torch.optim.optimizer import register_optimizer_step_post_hook

    # The two stamps the timing reads wait for the GPU (the others do not, so neither run is
    # slowed by a sync it would not make on its own).
    timed_stamps = {int(n) for n in os.environ.get("BENCH_SYNC_AT", "").split(",") if n}

    def stamp(*_):
        if len(stamps) + 1 in timed_stamps and torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    register_optimizer_step_post_hook(stamp)
    try:
        import wandb  # noqa: F401
    except ImportError:  # the script imports wandb at the top and uses it only for validation images
        import accelerate  # noqa: F401  (these look wandb up once, at import: before the stand-in)
        import diffusers  # noqa: F401
        import transformers  # noqa: F401

        sys.modules["wandb"] = types.ModuleType("wandb")
    module = target[3:] if target.startswith("-m ") else None
    sys.argv = [target] + argv
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        if module:
            from diffalign.cli import main

            code = main(argv)
            if code:
                raise SystemExit(code)
        else:
            runpy.run_path(target, run_name="__main__")
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)
        Path(stamps_file).write_text(json.dumps(stamps))


def timed_run(name: str, target: str, argv: list[str], args, work: Path, profile: str | None = None) -> dict:
    stamps = work / f"{name.replace(' ', '-')}.stamps.json"
    cmd = [sys.executable, __file__, "--child", str(stamps), target, *(["--profile-to", profile] if profile else []),
           "--", *argv]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1",
           "BENCH_SYNC_AT": f"{args.warmup},{args.warmup + args.steps}"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not stamps.exists():
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    times = json.loads(stamps.read_text())
    if len(times) < args.warmup + args.steps:
        raise SystemExit(f"{name}: {len(times)} optimiser steps, expected {args.warmup + args.steps}")
    steady = times[args.warmup + args.steps - 1] - times[args.warmup - 1]
    return {"name": name, "step_s": steady / args.steps, "pairs_per_s": args.batch_size * args.steps / steady,
            "wall_s": wall}


# The parts of a diffalign step, by the functions that do them (cumulative time, so a part
# includes what it calls; the profiler's own cost inflates the Python-heavy parts).
BREAKDOWN = [
    ("data (the DataLoader's next batch)", [("dataloader.py", "__next__")]),
    ("VAE encode", [("diffalign/models/sd.py", "encode_images")]),
    ("text encode", [("diffalign/step.py", "encode_texts")]),
    ("policy + reference forward", [("diffalign/elbo.py", "denoising_errors")]),
    ("  of which adapter.device / .dtype", [("diffalign/models/sd.py", "device"), ("diffalign/models/sd.py", "dtype")]),
    ("LoRA off and on for the reference", [("diffalign/models/lora.py", "_set_lora_enabled")]),
    ("diffusers' .device / .dtype walks, anywhere", [("diffusers/models/modeling_utils.py", "device"),
                                                     ("diffusers/models/modeling_utils.py", "dtype")]),
    ("unwrapping the denoiser (accelerate)", [("diffalign/models/lora.py", "_unwrap")]),
    ("backward", [("accelerate/accelerator.py", "backward")]),
    ("optimizer step", [("accelerate/optimizer.py", "step")]),
]


def breakdown(path: str, steps: int) -> list[tuple[str, float]]:
    """Milliseconds a step in each part of BREAKDOWN, from a cProfile of a whole run."""
    import pstats

    stats = pstats.Stats(path).stats
    rows = []
    for label, functions in BREAKDOWN:
        total = sum(value[3] for (filename, _, func), value in stats.items()
                    if any(filename.endswith(file) and func == name for file, name in functions))
        rows.append((label, 1000 * total / steps))
    return rows


def print_profile(path: str, steps: int, limit: int = 25) -> None:
    import pstats

    print("\ndiffalign's uncached step under cProfile (ms a step, over all steps; a part includes what it calls)")
    for label, ms in breakdown(path, steps):
        print(f"  {label:45} {ms:7.1f}")
    pstats.Stats(path).sort_stats("tottime").print_stats(limit)


def main() -> None:
    if "--child" in sys.argv:
        i = sys.argv.index("--child")
        stamps, target = sys.argv[i + 1], sys.argv[i + 2]
        rest = sys.argv[i + 3 :]
        profile = None
        if rest[:1] == ["--profile-to"]:
            profile, rest = rest[1], rest[2:]
        child(stamps, target, rest[1:], profile)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--script", required=True, help="path to diffusers' train_diffusion_dpo.py")
    parser.add_argument("--steps", type=int, default=50, help="timed optimiser steps (steady state)")
    parser.add_argument("--warmup", type=int, default=10, help="optimiser steps before the timing starts")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs a step")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--scale", choices=["tiny", "real"], default="tiny",
                        help="tiny: diffalign.testing's SD on the CPU; real: a real-size pipeline with random weights")
    parser.add_argument("--model", choices=["sd15", "sdxl"], default="sd15",
                        help="the architecture, tiny or real size (sdxl: give the script's SDXL twin as --script)")
    parser.add_argument("--resolution", type=int, default=None, help="training size (default 32 tiny, native real)")
    parser.add_argument("--rows", type=int, default=512, help="pairs in the parquet (512: 60 steps of 4 pairs read none twice)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="stored JPEG size, resized to --resolution (default 64 tiny, the resolution real)")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="passed to both trainers")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="passed to both trainers")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the GPU's dense peak for the dtype, for MFU (H100 SXM bf16: 989)")
    parser.add_argument("--repeats", type=int, default=1, help="run each row this many times, alternating; the best counts")
    parser.add_argument("--only", default="diffusers,diffalign,diffalign cached",
                        help="comma list of rows: diffusers, diffalign, diffalign cached")
    parser.add_argument("--diffalign-extra", nargs=argparse.REMAINDER, default=[],
                        help="more `diffalign train` flags (last on the line)")
    parser.add_argument("--profile", action="store_true", help="cProfile diffalign's uncached run and print the top")
    parser.add_argument("--profile-row", default="diffalign", help="the row --profile profiles: diffalign or 'diffalign cached'")
    parser.add_argument("--workdir", default=None, help="keep the inputs and runs here (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if not Path(args.script).is_file():
        raise SystemExit(f"--script {args.script} not found: fetch train_diffusion_dpo.py from the diffusers repository")

    native = {"sd15": 512, "sdxl": 1024}[args.model] if args.scale == "real" else 32
    args.resolution = args.resolution or native
    args.image_size = args.image_size or (64 if args.scale == "tiny" else args.resolution)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-vs-diffusers-"))
    work.mkdir(parents=True, exist_ok=True)
    model, data = build_model(work, args.scale, args.model), build_data(work, args.rows, args.image_size)
    gpu = _cuda_available()
    flops = step_flops(args.scale, args.model, args.batch_size, args.resolution, args.rank) if gpu else None
    rows = [r.strip() for r in args.only.split(",")]
    results: dict[str, list[dict]] = {r: [] for r in rows}
    for repeat in range(args.repeats):
        for row in rows:
            out = work / f"run-{row.replace(' ', '-')}-{repeat}"
            shutil.rmtree(out, ignore_errors=True)
            if row == "diffusers":
                r = timed_run(row, args.script, diffusers_command(args.script, model, data, out, args)[1:], args, work)
            elif row in ("diffalign", "diffalign cached"):
                profile = str(work / "diffalign.prof") if args.profile and row == args.profile_row and repeat == 0 else None
                r = timed_run(row, "-m diffalign.cli", diffalign_command(model, data, out, args, row.endswith("cached")),
                              args, work, profile)
            else:
                raise SystemExit(f"unknown row {row!r}: choose diffusers, diffalign, diffalign cached")
            results[row].append(r)
            print(f"  {row:17} run {repeat + 1}: {r['pairs_per_s']:.2f} pairs/s ({1000 * r['step_s']:.0f} ms a step)",
                  flush=True)
    best = {row: max(runs, key=lambda r: r["pairs_per_s"]) for row, runs in results.items()}
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    model_name = f"tiny {args.model}" if args.scale == "tiny" else args.model
    print(f"\n{model_name}, batch {args.batch_size} pairs, LoRA rank {args.rank}, {args.resolution} px, "
          f"mixed precision {args.mixed_precision}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
          f"{args.steps} steps after {args.warmup} warm-up, OMP_NUM_THREADS={threads}, best of {args.repeats}")
    base = best.get("diffusers")
    print(f"{'row':18} {'pairs/s':>8} {'ms/step':>8} {'vs diffusers':>12}" + (f" {'MFU':>6}" if flops else ""))
    for row, r in best.items():
        ratio = f"{r['pairs_per_s'] / base['pairs_per_s']:.2f}x" if base else "-"
        if flops:
            r["mfu"] = flops / r["step_s"] / (args.peak_tflops * 1e12)
        mfu = f" {100 * r['mfu']:5.1f}%" if flops else ""
        print(f"{row:18} {r['pairs_per_s']:8.2f} {1000 * r['step_s']:8.1f} {ratio:>12}{mfu}")
    if flops:
        print(f"one step = {flops / 1e12:.2f} TFLOP (policy forward + backward, reference forward); "
              f"MFU against {args.peak_tflops:g} TFLOP/s")
    if args.profile and (work / "diffalign.prof").exists():
        print_profile(str(work / "diffalign.prof"), args.warmup + args.steps)
    if args.json:
        Path(args.json).write_text(json.dumps({"best": best, "runs": results, "threads": threads, "step_flops": flops}, indent=1))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
