"""toy-spm: the toy world's step-aware preference model (SPO's SPM), for `--reward toy-spm`.

Built from toy-reward (`SPMReward.from_clip`: a fresh SPM scores exactly as toy-reward at any
t) and trained with `diffalign train-spm` on toy-sd's pairs (toy-data/toy-sd/pairs.parquet,
labelled by toy-reward on clean samples) noised through toy-sd: the same noise at the same
random t for both images, toy-sd's guided x0 prediction decoded and scored at t. A seeded 10%
of the pairs' prompts is held out (HELDOUT_SHARE); they are written to the asset as
heldout_prompts.txt, which benchmarks/bench_spm.py reads to measure the SPM's pairwise accuracy
on noised pairs it never trained on. The weights ship in fp16 (the loader upcasts).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

HELDOUT_SHARE = 0.1
SPLIT_SEED = 0
STEPS, BATCH_SIZE, LR = 800, 16, 1e-4  # about 7 CPU minutes of one thread
EVAL_TIMESTEPS = (0, 250, 500, 750, 950)


def split_pairs(pairs: Path, work: Path) -> tuple[Path, Path, list[str]]:
    """(training parquet, held-out parquet, held-out prompts): a seeded HELDOUT_SHARE of the prompts."""
    import pyarrow
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(pairs)
    prompts = sorted(set(table.column("caption").to_pylist()))
    heldout = sorted(random.Random(SPLIT_SEED).sample(prompts, max(1, round(HELDOUT_SHARE * len(prompts)))))
    mask = pc.is_in(table.column("caption"), value_set=pyarrow.array(heldout))
    work.mkdir(parents=True, exist_ok=True)
    train_path, heldout_path = work / "spm-train.parquet", work / "spm-heldout.parquet"
    pq.write_table(table.filter(pc.invert(mask)), train_path)
    pq.write_table(table.filter(mask), heldout_path)
    return train_path, heldout_path, heldout


def heldout_pairs(pairs: Path, resolution: int):
    """A held-out parquet as a diffalign pair dataset (ties kept, as train-spm reads them)."""
    from diffalign.train_spm import SPMConfig, build_pairs

    return build_pairs(SPMConfig(base_model="", dataset=str(pairs), init="", output_dir="", resolution=resolution))


def build_toy_spm(out: Path, work: Path, device: torch.device, smoke: bool = False, log=print) -> dict:
    """Train toy-spm from out/toy-reward (else the shipped one) on out/toy-data/toy-sd pairs
    noised through out/toy-sd, and write it to out/toy-spm."""
    from diffalign.edges import write_files
    from diffalign.models import load_adapter
    from diffalign.paths import asset
    from diffalign.rewards import load_reward
    from diffalign.rewards.spm import SPMReward
    from diffalign.train_spm import SPMConfig, noised_pair_accuracy, train_spm

    start = time.time()
    local = {name: out / name if (out / name).exists() else asset(name) for name in ("toy-reward", "toy-sd", "toy-data")}
    train_path, heldout_path, heldout = split_pairs(local["toy-data"] / "toy-sd" / "pairs.parquet", work / "toy-spm")
    steps = 2 if smoke else STEPS
    run = work / "toy-spm" / "run"
    summary = train_spm(SPMConfig(base_model=str(local["toy-sd"]), dataset=str(train_path), init=str(local["toy-reward"]),
                                  output_dir=str(run), batch_size=BATCH_SIZE, lr=LR, max_steps=steps, seed=0,
                                  log_every=50, mixed_precision="no"))
    spm = SPMReward.from_pretrained(str(run), name="toy-spm")
    folder = out / "toy-spm"
    folder.mkdir(parents=True, exist_ok=True)
    files = spm.state_files(torch.float16)
    files["heldout_prompts.txt"] = "".join(p + "\n" for p in heldout).encode()
    write_files(folder, files, "toy-spm")
    # Held-out accuracy on noised pairs (benchmarks/bench_spm.py reports it beside toy-reward's).
    adapter = load_adapter(str(local["toy-sd"]), device=device)
    pairs = heldout_pairs(heldout_path, summary["config"]["resolution"])
    scorers = {"toy-spm": load_reward("toy-spm", path=str(folder), device=device),
               "toy-reward": load_reward("toy-reward", path=str(local["toy-reward"]), device=device)}
    accuracy = noised_pair_accuracy(adapter, scorers, pairs, list(EVAL_TIMESTEPS),
                                    guidance_scale=summary["config"]["guidance_scale"], seed=0)
    metrics = {"steps": steps, "train_pairs": summary["pairs"], "heldout_prompts": len(heldout),
               "train_loss": round(summary["loss"], 4), "train_acc": round(summary["train_acc"], 4),
               "heldout_acc": {name: {str(t): round(a, 4) for t, a in acc.items()} for name, acc in accuracy.items()},
               "bytes": sum(p.stat().st_size for p in folder.iterdir()), "seconds": round(time.time() - start, 1)}
    log(f"[toy-spm] saved to {folder}: {metrics}")
    return metrics
