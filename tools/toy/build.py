"""`python -m tools.toy build`: rebuild the shipped toy assets from scratch, seeded.

Run from the repo root of a clone (tools/ is not installed with the package):

    python -m tools.toy build                       # everything, in dependency order
    python -m tools.toy build --only toy-reward,toy-judge --device cuda
    python -m tools.toy grid --out docs/img/toy-samples.png   # rendered vs sampled scenes

Builders, in order (each reads only what the earlier ones wrote):
  toy-reward, toy-judge   CLIP rewards (clip_reward.py)
  vae                     the shared autoencoder, kept in --work (generators.py)
  toy-sd, toy-flow        the base generators (generators.py)
  toy-data                prompt lists and preference data from both generators (preference_data.py)
  toy-spm                 the step-aware preference model of SPO, trained on toy-sd's pairs (spm.py)

Every random draw is seeded, so a CPU rebuild gives the same assets every time; a GPU
rebuild is the same recipe but not bit-identical (different kernels). Metrics land in
<work>/metrics/<builder>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffalign.errors import DiffalignError

BUILDERS = ("toy-reward", "toy-judge", "vae", "toy-sd", "toy-flow", "toy-data", "toy-spm")
# toy-data: every training prompt, best and worst of 8 samples (plus two between, for the K=4
# ranked lists). 15,552 samples: minutes on a GPU, about 1.7 hours on a 2-core CPU.
CANDIDATES = 8
# DCPO-p's loser caption per generator (preference_data.loser_caption): on each generator, the
# kind that gave DCPO the larger held-out gain (docs/benchmarks.md, "What did not work"); why
# the two generators differ is not known. Any other generator folder gets the rules' one-word
# change, what `diffalign captions` writes for any user's data.
LOSER_CAPTIONS = {"toy-sd": "perturb", "toy-flow": "paraphrase"}


def tokenizer_dir(work: Path) -> Path:
    from diffalign.rewards.clip_tokenizer import write_clip_tokenizer

    folder = work / "clip-tokenizer"
    if not (folder / "vocab.json").is_file():
        write_clip_tokenizer(folder)
    return folder


def run_builder(name: str, out: Path, work: Path, device: torch.device, smoke: bool = False,
                data_models: tuple[str, ...] = ("toy-sd", "toy-flow")) -> dict:
    from dataclasses import replace

    from tools.toy import clip_reward, generators, preference_data

    tok = tokenizer_dir(work)
    spec = generators.GeneratorSpec()
    reward_spec, judge_spec = clip_reward.REWARD_SPEC, clip_reward.JUDGE_SPEC
    prompts_per_model = {"toy-sd": None, "toy-flow": None}  # None: all 972 training prompts
    if smoke:  # a few steps of everything: checks the plumbing, not the models
        spec = replace(spec, vae_steps=2, steps=2, batch_size=8, renders_per_scene=1)
        reward_spec = replace(reward_spec, steps=2, batch_size=16, renders_per_scene=1)
        judge_spec = replace(judge_spec, steps=2, batch_size=16, renders_per_scene=1)
        prompts_per_model = {"toy-sd": 8, "toy-flow": 4}
    heldout_prompts = 4 if smoke else None
    if name in ("toy-reward", "toy-judge"):
        metrics = clip_reward.train_clip(reward_spec if name == "toy-reward" else judge_spec, out / name, tok, device)
        return {**metrics, "vocab_size": trim_asset(out / name)}
    if name == "vae":
        return generators.train_vae(work / "vae", spec, device)
    if name == "toy-spm":
        from tools.toy.spm import build_toy_spm

        return build_toy_spm(out, work, device, smoke)
    if name in ("toy-sd", "toy-flow"):
        require(work / "vae" / "config.json", "vae")
        train = generators.train_toy_sd if name == "toy-sd" else generators.train_toy_flow
        metrics = train(out / name, work / "vae", tok, spec, device)
        write_sampling_defaults(out / name)
        return {**metrics, "vocab_size": trim_asset(out / name)}
    # toy-data. The rewards do not depend on the generators: a generator built into another --out
    # is labelled and judged by the shipped toy-reward and toy-judge unless --out has its own.
    from diffalign.paths import asset

    rewards = {name: out / name if (out / name).exists() else asset(name) for name in ("toy-reward", "toy-judge")}
    for name, folder in rewards.items():
        require(folder, name)
    for needed in data_models:
        require(out / needed, needed)
    data = out / "toy-data"
    preference_data.write_prompt_lists(data)
    return {
        model: preference_data.build_preference_data(out / model, rewards["toy-reward"], rewards["toy-judge"], data / model,
                                                     device, prompts_per_model.get(model), heldout_prompts,
                                                     CANDIDATES, LOSER_CAPTIONS.get(model, "perturb"))
        for model in data_models
    }


def trim_asset(folder: Path) -> int:
    """Models train with CLIP's full tokenizer and ship with the toy vocabulary (tools/toy/vocab.py)."""
    from tools.toy.vocab import trim_asset as trim, trimmed_vocabulary

    trim(folder)
    return len(trimmed_vocabulary()[0])


def write_sampling_defaults(folder: Path) -> None:
    """diffalign.json: the sampler settings the toy data is drawn with, which every diffalign
    command then takes as this model's defaults (diffalign.edges.sampling_defaults)."""
    from tools.toy.preference_data import GUIDANCE, STEPS

    (folder / "diffalign.json").write_text(json.dumps({"num_inference_steps": STEPS, "guidance_scale": GUIDANCE}) + "\n")


def require(path: Path, builder: str) -> None:
    if not path.exists():
        raise DiffalignError(f"{path} is missing: build it first with `python -m tools.toy build --only {builder}`")


def build(only: list[str], out: Path, work: Path, device_name: str, smoke: bool = False,
          data_models: tuple[str, ...] = ("toy-sd", "toy-flow")) -> dict:
    from tools.toy.common import pick_device

    unknown = [n for n in only if n not in BUILDERS]
    if unknown:
        raise DiffalignError(f"unknown toy builder(s) {unknown}: choose from {', '.join(BUILDERS)}")
    device = pick_device(device_name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    (work / "metrics").mkdir(parents=True, exist_ok=True)
    results = {}
    for name in [b for b in BUILDERS if b in only]:
        start = time.time()
        print(f"== building {name} on {device}", flush=True)
        results[name] = run_builder(name, out, work, device, smoke, data_models)
        results[name + "_seconds"] = round(time.time() - start, 1)
        stem = name if name != "toy-data" else f"toy-data-{'+'.join(data_models)}"
        (work / "metrics" / f"{stem}.json").write_text(json.dumps(
            {"metrics": results[name], "seconds": results[name + "_seconds"], "device": str(device)}, indent=2) + "\n")
    return results


def write_sample_grid(out_png: Path, assets: Path, device_name: str = "cpu", rows: int = 6) -> Path:
    """Rows of held-out prompts: a render of the scene, then 3 toy-sd and 3 toy-flow samples."""
    from tools.toy import preference_data
    from tools.toy.common import pick_device
    from tools.toy.render import make_grid, render, split_prompts

    device = pick_device(device_name)
    _, heldout = split_prompts()
    scenes = heldout[:: max(1, len(heldout) // rows)][:rows]
    tiles = {}
    for model in ("toy-sd", "toy-flow"):
        pipe = preference_data.load_toy_pipeline(assets / model, device)
        prompts = [s.prompt for s in scenes for _ in range(3)]
        seeds = list(range(len(prompts)))
        tiles[model] = preference_data.generate(pipe, prompts, seeds, desc=f"grid {model}")
    images = []
    for i, scene in enumerate(scenes):
        images.append(render(scene, 0))
        for model in ("toy-sd", "toy-flow"):
            images += [to_pil(tiles[model][3 * i + j]) for j in range(3)]
    out_png.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, columns=7, scale=3).save(out_png)
    (out_png.with_suffix(".txt")).write_text("".join(s.prompt + "\n" for s in scenes))
    return out_png


def to_pil(image01: torch.Tensor):
    from PIL import Image

    return Image.fromarray((image01.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def main(argv: list[str] | None = None) -> int:
    from diffalign.paths import assets_dir

    parser = argparse.ArgumentParser(prog="python -m tools.toy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="rebuild toy assets")
    b.add_argument("--only", default=",".join(BUILDERS), help=f"comma-separated subset of {', '.join(BUILDERS)}")
    b.add_argument("--out", type=Path, default=None, help="assets folder (default: the package's assets/)")
    b.add_argument("--work", type=Path, default=Path("build/toy"), help="intermediate files (tokenizer, vae, metrics)")
    b.add_argument("--device", default="cpu", help="cpu (default, reproducible), cuda or auto")
    b.add_argument("--data-models", default="toy-sd,toy-flow", help="which generators toy-data samples from")
    b.add_argument("--smoke", action="store_true", help="two steps of everything: a plumbing check, useless models")
    g = sub.add_parser("grid", help="write a picture of rendered vs sampled held-out scenes")
    g.add_argument("--out", type=Path, default=Path("docs/img/toy-samples.png"))
    g.add_argument("--assets", type=Path, default=None, help="assets folder (default: the package's assets/)")
    g.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            only = [n.strip() for n in args.only.split(",") if n.strip()]
            data_models = tuple(m.strip() for m in args.data_models.split(",") if m.strip())
            results = build(only, args.out or assets_dir(), args.work, args.device, args.smoke, data_models)
            print(json.dumps(results, indent=2))
        else:
            print(write_sample_grid(args.out, args.assets or assets_dir(), args.device))
    except DiffalignError as err:
        print(f"python -m tools.toy: error: {err}")
        return 2
    return 0
