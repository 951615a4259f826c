"""`python -m diffalign.toy build`: rebuild the shipped toy assets from scratch, seeded.

    python -m diffalign.toy build                       # everything, in dependency order
    python -m diffalign.toy build --only toy-reward,toy-judge --device cuda
    python -m diffalign.toy grid --out docs/img/toy-samples.png   # rendered vs sampled scenes
    python -m diffalign.toy trim-vocab                  # shrink saved models to the toy vocabulary

Builders, in order (each reads only what the earlier ones wrote):
  toy-reward, toy-judge   CLIP rewards (clip_reward.py)
  vae                     the shared autoencoder, kept in --work (generators.py)
  toy-sd, toy-flow        the base generators (generators.py)
  toy-data                prompt lists and preference data from both generators (preference_data.py)

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

BUILDERS = ("toy-reward", "toy-judge", "vae", "toy-sd", "toy-flow", "toy-data")
# toy-data: every training prompt, best and worst of 8 samples (plus two between, for the K=4
# ranked lists). 15,552 samples: minutes on a GPU, about 1.7 hours on a 2-core CPU.
DATA_PROMPTS = None  # all 972
CANDIDATES = 8
# DCPO-p's loser caption per generator (preference_data.loser_caption): on toy-flow the prompt
# reworded wins more than the caption rules' one-word change, on toy-sd the reverse
# (docs/benchmarks.md, "DCPO in the toy world"). Any other generator folder gets the rules'.
LOSER_CAPTIONS = {"toy-sd": "perturb", "toy-flow": "paraphrase"}


def tokenizer_dir(work: Path) -> Path:
    from diffalign.rewards.clip_tokenizer import write_clip_tokenizer

    folder = work / "clip-tokenizer"
    if not (folder / "vocab.json").is_file():
        write_clip_tokenizer(folder)
    return folder


def run_builder(name: str, out: Path, work: Path, device: torch.device, smoke: bool = False,
                data_models: tuple[str, ...] = ("toy-sd", "toy-flow"), resume_sd: int = 0,
                data_prompts: int | None = None, candidates: int | None = None,
                sd_cycles: int | None = None, sd_variant: str | None = None, reworded: float = 0.0,
                flow_reword_steps: int = 0, resume_flow: bool = False) -> dict:
    from dataclasses import replace

    from diffalign.toy import clip_reward, generators, preference_data

    tok = tokenizer_dir(work)
    spec = generators.GeneratorSpec()
    if sd_cycles:
        spec = replace(spec, sd_cycles=sd_cycles)
    if sd_variant:
        spec = replace(spec, sd_variant=sd_variant)
    if reworded:
        spec = replace(spec, reworded=reworded)
    if flow_reword_steps:
        spec = replace(spec, flow_reword_steps=flow_reword_steps)
    reward_spec, judge_spec = clip_reward.REWARD_SPEC, clip_reward.JUDGE_SPEC
    prompts_per_model = {m: data_prompts or DATA_PROMPTS for m in ("toy-sd", "toy-flow")}
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
    if name in ("toy-sd", "toy-flow"):
        if not (name == "toy-flow" and resume_flow):
            require(work / "vae" / "config.json", "vae")
        if name == "toy-sd":
            metrics = generators.train_toy_sd(out / name, work / "vae", tok, spec, device, resume=resume_sd)
        elif resume_flow:  # the rewording stage only, on the toy-flow already in --out
            require(out / name / "model_index.json", "toy-flow")
            metrics = {}
        else:
            metrics = generators.train_toy_flow(out / name, work / "vae", tok, spec, device)
        vocab_size = trim_asset(out / name)
        if name == "toy-flow" and spec.flow_reword_steps:
            metrics.update(generators.reword_toy_flow(out / name, work, spec, device))
        return {**metrics, "vocab_size": vocab_size}
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
                                                     device, prompts_per_model[model], heldout_prompts,
                                                     candidates or CANDIDATES, LOSER_CAPTIONS.get(model, "perturb"))
        for model in data_models
    }


def trim_asset(folder: Path) -> int:
    """Models train with CLIP's full tokenizer and ship with the toy vocabulary (toy/vocab.py)."""
    from diffalign.toy.vocab import trim_asset as trim, trimmed_vocabulary

    trim(folder)
    return len(trimmed_vocabulary()[0])


def require(path: Path, builder: str) -> None:
    if not path.exists():
        raise DiffalignError(f"{path} is missing: build it first with `python -m diffalign.toy build --only {builder}`")


def build(only: list[str], out: Path, work: Path, device_name: str, smoke: bool = False,
          data_models: tuple[str, ...] = ("toy-sd", "toy-flow"), resume_sd: int = 0,
          data_prompts: int | None = None, candidates: int | None = None, sd_cycles: int | None = None,
          sd_variant: str | None = None, reworded: float = 0.0, flow_reword_steps: int = 0,
          resume_flow: bool = False) -> dict:
    from diffalign.toy.common import pick_device

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
        results[name] = run_builder(name, out, work, device, smoke, data_models, resume_sd, data_prompts, candidates,
                                    sd_cycles, sd_variant, reworded, flow_reword_steps, resume_flow)
        results[name + "_seconds"] = round(time.time() - start, 1)
        stem = name if name != "toy-data" else f"toy-data-{'+'.join(data_models)}"
        (work / "metrics" / f"{stem}.json").write_text(json.dumps(
            {"metrics": results[name], "seconds": results[name + "_seconds"], "device": str(device)}, indent=2) + "\n")
    return results


def write_sample_grid(out_png: Path, assets: Path, device_name: str = "cpu", rows: int = 6) -> Path:
    """Rows of held-out prompts: a render of the scene, then 3 toy-sd and 3 toy-flow samples."""
    from diffalign.toy import preference_data
    from diffalign.toy.common import pick_device
    from diffalign.toy.render import make_grid, render, split_prompts

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
    from diffalign.toy.generators import SD_VARIANTS, SHIPPED_SD_VARIANT

    parser = argparse.ArgumentParser(prog="python -m diffalign.toy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="rebuild toy assets")
    b.add_argument("--only", default=",".join(BUILDERS), help=f"comma-separated subset of {', '.join(BUILDERS)}")
    b.add_argument("--out", type=Path, default=None, help="assets folder (default: the package's assets/)")
    b.add_argument("--work", type=Path, default=Path("build/toy"), help="intermediate files (tokenizer, vae, metrics)")
    b.add_argument("--device", default="cpu", help="cpu (default, reproducible), cuda or auto")
    b.add_argument("--data-models", default="toy-sd,toy-flow", help="which generators toy-data samples from")
    b.add_argument("--data-prompts", type=int, default=None, help="toy-data: training prompts per generator")
    b.add_argument("--candidates", type=int, default=None, help="toy-data: samples per prompt, ranked down to K=4")
    b.add_argument("--resume-sd", type=int, nargs="?", const=1, default=0, metavar="N",
                   help="toy-sd: continue from the toy-sd in --out, saved after N training cycles (default 1)")
    b.add_argument("--sd-cycles", type=int, default=None, help="toy-sd: training cycles in all (default: the recipe's)")
    b.add_argument("--sd-variant", default=SHIPPED_SD_VARIANT, choices=tuple(SD_VARIANTS),
                   help=f"toy-sd: text attention at 8x8 only (attn8, shipped before) or at 16x16 too with 8 heads "
                        f"(attn16) or one (attn16-1head); default {SHIPPED_SD_VARIANT}, what ships")
    b.add_argument("--reworded", type=float, default=0.0, metavar="SHARE",
                   help="toy-sd, toy-flow: share of training prompts given in another word order "
                        "(toy.render.paraphrase); 0, what ships, trains on one word order")
    b.add_argument("--flow-reword-steps", type=int, default=0, metavar="N",
                   help="toy-flow: a second stage of N steps with half the prompts reworded, from the saved "
                        "toy-flow (0, what ships: none)")
    b.add_argument("--resume-flow", action="store_true",
                   help="toy-flow: run only the rewording stage, on the toy-flow already in --out")
    b.add_argument("--smoke", action="store_true", help="two steps of everything: a plumbing check, useless models")
    t = sub.add_parser("trim-vocab", help="shrink shipped toy models to the toy vocabulary (idempotent)")
    t.add_argument("--assets", type=Path, default=None, help="assets folder (default: the package's assets/)")
    g = sub.add_parser("grid", help="write a picture of rendered vs sampled held-out scenes")
    g.add_argument("--out", type=Path, default=Path("docs/img/toy-samples.png"))
    g.add_argument("--assets", type=Path, default=None, help="assets folder (default: the package's assets/)")
    g.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            only = [n.strip() for n in args.only.split(",") if n.strip()]
            data_models = tuple(m.strip() for m in args.data_models.split(",") if m.strip())
            results = build(only, args.out or assets_dir(), args.work, args.device, args.smoke, data_models,
                            args.resume_sd, args.data_prompts, args.candidates, args.sd_cycles, args.sd_variant,
                            args.reworded, args.flow_reword_steps, args.resume_flow)
            print(json.dumps(results, indent=2))
        elif args.command == "trim-vocab":
            for name in ("toy-sd", "toy-flow", "toy-reward", "toy-judge"):
                if ((args.assets or assets_dir()) / name).is_dir():
                    print(name, "vocabulary:", trim_asset((args.assets or assets_dir()) / name))
        else:
            print(write_sample_grid(args.out, args.assets or assets_dir(), args.device))
    except DiffalignError as err:
        print(f"diffalign.toy: error: {err}")
        return 2
    return 0
