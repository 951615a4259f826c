"""Probes of the toy world that explain its win rates (docs/benchmarks.md, "The toy world").

    python benchmarks/diagnose_toy.py headroom                     # judge score: renders vs base samples
    python benchmarks/diagnose_toy.py sensitivity                  # how much 1% weight noise re-draws
    python benchmarks/diagnose_toy.py sensitivity --lora OUT/quickstart-dpo --attention-only --noise 0.11
    python benchmarks/diagnose_toy.py branches --lora OUT/quickstart-mapo
    python benchmarks/diagnose_toy.py guidance --lora OUT/quickstart-dpo --scales 2,4,6
    python benchmarks/diagnose_toy.py samplers                     # is the empty-scene share the sampler's?
    python benchmarks/diagnose_toy.py drawn-pairs --output drawn.parquet   # pairs without empty scenes
    python benchmarks/diagnose_toy.py dcpo-captions --captions paraphrase --output p.parquet
    python benchmarks/diagnose_toy.py paraphrase                   # does the model read a reworded prompt?

Every probe generates with the evaluation's seeds (`seed + prompt_index * images + j`) on the
held-out prompts, 20 steps (`--num-inference-steps`), and scores with toy-judge and toy-reward.

* headroom: mean score of the renderer's own picture of each held-out prompt against the base
  model's samples (and the LoRA's, with --lora), and the share of samples that show no shape at
  all (fewer than 1% of pixels differ from the image's median colour by more than 60 of 255).
  A large gap means the generator, not the reward, limits what alignment can show.
* sensitivity: adds Gaussian noise of `--noise` times each weight tensor's standard deviation to
  the denoiser (every weight, or with --attention-only the attention projections a LoRA adapts)
  and counts the images that change visibly (max pixel change > 64 of 255). With --lora it first
  does the same count for the trained LoRA and prints its size, ||BA||/||W||, so a trained
  update can be set beside a random one of the same size.
* branches: classifier-free guidance runs the denoiser twice (empty prompt, prompt). Compares
  the LoRA in both passes (what diffusers does) with the LoRA in the prompt pass only.
* guidance: the model's win rate over the base at several guidance scales.
* samplers: the base model's no-shape share and mean scores under several diffusers schedulers
  (DDIM with leading or trailing spacing, DPM-Solver++, Euler ancestral, DDIM at 50 steps), each
  built from the model's own scheduler config, at the same seeds and guidance.
* drawn-pairs: no sampling. Writes Pick-a-Pic pairs from the shipped K = 4 lists of `--model`
  (assets/toy-data/MODEL/ranked.parquet) that leave out the images with no shape: the best
  against the worst *drawn* image of each list, for the prompts with two or more. Train on it
  with `diffalign train --config configs/quickstart/toy-sd/dpo.yaml --dataset drawn.parquet`.
* dcpo-captions: no sampling. The shipped pairs of `--model` with other DCPO captions, to measure
  how far from the prompt the loser's caption can go (docs/benchmarks.md, "What did not work").
  `--captions same`: both captions are the prompt (DCPO is then Diffusion-DPO at DCPO's beta);
  `paraphrase`: the loser gets the prompt reworded, same meaning (tools.toy.render.paraphrase,
  one rewrite; toy-flow's shipped caption_1); `edit`: the loser gets the prompt with one
  attribute changed at random within the toy grammar (tools.toy.render.perturb, a DCPO-p
  perturbation in toy words only); `described`: both images get a caption, the prompt with each
  attribute changed to the value toy-reward scores highest for the image (two sweeps; never a
  held-out prompt). Train on it with
  `diffalign train --config configs/quickstart/toy-sd/dcpo.yaml --dataset F`.
* paraphrase: the model's samples from each held-out prompt reworded (tools.toy.render.paraphrase)
  against its samples from the prompt itself, same seeds, both scored on the prompt. A win near
  0.5 means the model reads the rewording as the same prompt.

Run from the repo root of a clone: the probes import tools.toy, which is not installed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ (not installed) from a clone

from diffalign.edges import load_pipeline, load_rewards, read_prompts
from diffalign.evaluate import generate, image_seeds, load_lora, pipeline_denoiser, score, summarise

REWARDS = "toy-judge,toy-reward"


def setup(args):
    prompts = read_prompts("toy")[: args.max_prompts]
    all_prompts = [p for p in prompts for _ in range(args.num_images)]
    seeds = image_seeds(len(prompts), args.num_images, args.seed)
    prompt_ids = [i for i in range(len(prompts)) for _ in range(args.num_images)]
    device = torch.device("cpu")
    pipe = load_pipeline(args.model, torch.float32, device=device)
    return pipe, all_prompts, seeds, prompt_ids, load_rewards(REWARDS, device), device


def call_kwargs(args, guidance: float | None = None) -> dict:
    return {"num_inference_steps": args.num_inference_steps,
            "guidance_scale": args.guidance_scale if guidance is None else guidance}


def report(label: str, model_images, base_images, prompts, prompt_ids, rewards, device) -> None:
    for name, reward in rewards.items():
        s = summarise(score(reward, model_images, prompts, 32, device), score(reward, base_images, prompts, 32, device),
                      prompt_ids)
        lo, hi = s["win_rate_ci"]
        print(f"{label:28} {name:10} win {s['win_rate']:.3f} [{lo:.3f}, {hi:.3f}]  mean {s['baseline']['reward_mean']:6.2f}"
              f" -> {s['model']['reward_mean']:6.2f}  d {s['gain']['effect_size_d']:5.2f}  moved {s['gain']['moved_share']:.2f}",
              flush=True)


def png_tensors(pngs) -> torch.Tensor:
    """uint8 (N, 3, H, W) from PNG bytes, as the toy data stores its images."""
    import io

    import numpy as np
    from PIL import Image

    return torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(b)).convert("RGB"))).permute(2, 0, 1)
                        for b in pngs])


def shows_no_shape(images: torch.Tensor) -> torch.Tensor:
    """True where under 1% of the pixels differ from the image's median colour by more than 60/255."""
    x = images.float()
    median = x.flatten(2).median(2).values[:, :, None, None]
    return ((x - median).abs().amax(1) > 60).float().mean((1, 2)) < 0.01


def headroom(args) -> None:
    import numpy as np

    from tools.toy.render import parse_prompt, render

    pipe, prompts, seeds, _, rewards, device = setup(args)
    renders = torch.stack([torch.from_numpy(np.array(render(parse_prompt(p), 10_000_000 + s))).permute(2, 0, 1)
                           for p, s in zip(prompts, seeds)])
    sets = [("renders", renders), (f"{args.model} samples", generate(pipe, prompts, seeds, 32, call_kwargs(args), "base"))]
    if args.lora:
        load_lora(pipe, args.lora)
        sets.append(("LoRA samples", generate(pipe, prompts, seeds, 32, call_kwargs(args), "LoRA")))
    for label, images in sets:
        print(f"{label:18} no shape: {shows_no_shape(images).float().mean():.2f}")
    for name, reward in rewards.items():
        for label, images in sets:
            values = torch.tensor(score(reward, images, prompts, 32, device))
            print(f"{name:10} {label:18} mean {values.mean():6.2f}  std {values.std():5.2f}")


# What diffalign's LoRA adapts: UNet attention, and SD3's joint-attention context projections.
ATTENTION_PROJECTIONS = ("to_q.", "to_k.", "to_v.", "to_out.0.", "add_q_proj.", "add_k_proj.", "add_v_proj.",
                         "to_add_out.")
LORA_KEY_PAIRS = ((".lora.down.weight", ".lora.up.weight"), (".lora_A.weight", ".lora_B.weight"))  # old / peft


def print_change(label: str, before: torch.Tensor, after: torch.Tensor) -> None:
    changed = (after - before).abs().flatten(1).amax(1) > 64
    print(f"{label}: mean pixel change {(after - before).abs().mean():.1f}/255, {changed.float().mean():.2f} of "
          f"{len(before)} images changed visibly (max pixel change > 64)", flush=True)


def lora_relative_norms(pipe, lora: str) -> list[float]:
    """||B A|| / ||W|| for every adapted weight of a diffalign/diffusers LoRA file."""
    from safetensors.torch import load_file

    state = load_file(f"{lora}/pytorch_lora_weights.safetensors")
    weights = dict(pipeline_denoiser(pipe).named_parameters())
    ratios = []
    for key, down in state.items():
        for down_suffix, up_suffix in LORA_KEY_PAIRS:
            if key.endswith(down_suffix):
                up = state[key[: -len(down_suffix)] + up_suffix]
                base = weights[key.split(".", 1)[1][: -len(down_suffix)] + ".weight"]
                ratios.append(float((up.float() @ down.float()).norm() / base.detach().norm()))
    return ratios


def sensitivity(args) -> None:
    pipe, prompts, seeds, _, _, _ = setup(args)
    before = generate(pipe, prompts, seeds, 32, call_kwargs(args), "base").float()
    if args.lora:
        ratios = sorted(lora_relative_norms(pipe, args.lora))
        load_lora(pipe, args.lora)
        print_change(f"the LoRA (||BA||/||W|| median {ratios[len(ratios) // 2]:.3f})", before,
                     generate(pipe, prompts, seeds, 32, call_kwargs(args), "LoRA").float())
        pipe.unload_lora_weights()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, weight in pipeline_denoiser(pipe).named_parameters():
            attention = weight.dim() == 2 and any(key in name for key in ATTENTION_PROJECTIONS)
            if weight.numel() > 1 and (attention or not args.attention_only):
                weight.add_(torch.randn(weight.shape, generator=generator) * weight.std() * args.noise)
    where = "attention projections" if args.attention_only else "every weight"
    print_change(f"noise {args.noise:g} x std on {where}", before,
                 generate(pipe, prompts, seeds, 32, call_kwargs(args), "perturbed").float())


def lora_in_prompt_pass_only(net) -> Callable:
    """A forward for the CFG batch [empty prompt; prompt] that runs the first half without the LoRA."""
    forward = net.forward

    def split(*args, **kwargs):
        half = next(t for t in list(args) + list(kwargs.values()) if torch.is_tensor(t)).shape[0] // 2

        def take(part):
            pick = (lambda t: t[:half] if part == 0 else t[half:])
            sliced = lambda t: pick(t) if torch.is_tensor(t) and t.dim() > 0 and t.shape[0] == 2 * half else t
            return forward(*[sliced(a) for a in args], **{k: sliced(v) for k, v in kwargs.items()})[0]

        net.disable_lora()
        try:
            uncond = take(0)
        finally:
            net.enable_lora()
        return (torch.cat([uncond, take(1)]),)

    return split


def branches(args) -> None:
    pipe, prompts, seeds, ids, rewards, device = setup(args)
    base = generate(pipe, prompts, seeds, 32, call_kwargs(args), "base")
    load_lora(pipe, args.lora)
    both = generate(pipe, prompts, seeds, 32, call_kwargs(args), "LoRA in both passes")
    net = pipeline_denoiser(pipe)
    net.forward = lora_in_prompt_pass_only(net)
    prompt_only = generate(pipe, prompts, seeds, 32, call_kwargs(args), "LoRA in prompt pass")
    report("LoRA in both passes", both, base, prompts, ids, rewards, device)
    report("LoRA in the prompt pass only", prompt_only, base, prompts, ids, rewards, device)


def guidance(args) -> None:
    pipe, prompts, seeds, ids, rewards, device = setup(args)
    scales = [float(s) for s in args.scales.split(",")]
    base = {g: generate(pipe, prompts, seeds, 32, call_kwargs(args, g), f"base g={g}") for g in scales}
    load_lora(pipe, args.lora)
    for g in scales:
        report(f"guidance {g}", generate(pipe, prompts, seeds, 32, call_kwargs(args, g), f"LoRA g={g}"), base[g],
               prompts, ids, rewards, device)


def paraphrase(args) -> None:
    import random

    from tools.toy.render import paraphrase as reword
    from tools.toy.render import parse_prompt

    pipe, prompts, seeds, ids, rewards, device = setup(args)
    reworded = [reword(parse_prompt(p), random.Random(f"{args.seed}:{p}")) for p in prompts]
    base = generate(pipe, prompts, seeds, 32, call_kwargs(args), "prompts")
    report("reworded prompts", generate(pipe, reworded, seeds, 32, call_kwargs(args), "reworded"), base,
           prompts, ids, rewards, device)


# name -> (scheduler class, config overrides, steps); every one is built from the model's config
SAMPLERS = {
    "ddim-leading-20": ("DDIMScheduler", {}, 20),
    "ddim-trailing-20": ("DDIMScheduler", {"timestep_spacing": "trailing"}, 20),
    "dpmpp-20": ("DPMSolverMultistepScheduler", {}, 20),
    "euler-ancestral-20": ("EulerAncestralDiscreteScheduler", {}, 20),
    "ddim-leading-50": ("DDIMScheduler", {}, 50),
}


def samplers(args) -> None:
    import diffusers

    pipe, prompts, seeds, _, rewards, device = setup(args)
    config = pipe.scheduler.config
    for name, (cls, overrides, steps) in SAMPLERS.items():
        pipe.scheduler = getattr(diffusers, cls).from_config(config, **overrides)
        images = generate(pipe, prompts, seeds, 32, {"num_inference_steps": steps, "guidance_scale": args.guidance_scale}, name)
        means = [f"{reward_name} {torch.tensor(score(reward, images, prompts, 32, device)).mean():6.2f}"
                 for reward_name, reward in rewards.items()]
        print(f"{name:20} no shape {shows_no_shape(images).float().mean():.2f}  " + "  ".join(means), flush=True)


def drawn_pairs(args) -> None:
    import pandas as pd

    from diffalign.paths import asset

    path = asset("toy-data") / args.model / "ranked.parquet"
    if not path.is_file():
        raise SystemExit(f"drawn-pairs: no ranked lists at {path}: pass --model toy-sd or toy-flow")
    lists = pd.read_parquet(path)
    k = sum(c.startswith("jpg_") for c in lists.columns)
    rows = []
    for _, group in lists.iterrows():  # images are stored best first
        images = png_tensors(group[f"jpg_{j}"] for j in range(k))
        drawn = [j for j, empty in enumerate(shows_no_shape(images).tolist()) if not empty]
        if len(drawn) >= 2:
            rows.append({"caption": group["caption"], "jpg_0": group[f"jpg_{drawn[0]}"],
                         "jpg_1": group[f"jpg_{drawn[-1]}"], "label_0": 1.0, "label_1": 0.0})
    pd.DataFrame(rows).to_parquet(args.output)
    print(f"{len(rows)} of {len(lists)} lists have two or more drawn images: pairs written to {args.output}")


def describe(images01: torch.Tensor, prompts: list[str], reward_dir, sweeps: int = 2) -> list[str]:
    """A prompt-anchored toy captioner: start from each image's prompt and set one attribute at a
    time to the value toy-reward scores highest, over `sweeps` passes. Held-out scenes are never
    chosen, so no held-out prompt reaches the training text."""
    from dataclasses import replace

    from tools.toy import clip_reward, common
    from tools.toy.preference_data import load_clip
    from tools.toy.render import ATTRIBUTES, VALUES, all_scenes, parse_prompt, split_prompts

    model, tokenizer = load_clip(reward_dir, torch.device("cpu"))
    scenes = all_scenes()
    column = {scene: i for i, scene in enumerate(scenes)}
    heldout = set(split_prompts()[1])
    with torch.no_grad():
        texts = clip_reward.embed_texts(model, common.tokenize(tokenizer, [s.prompt for s in scenes],
                                                               clip_reward.TEXT_LENGTH))
        fit = torch.cat([clip_reward.embed_images(model, images01[i : i + 256])
                         for i in range(0, len(images01), 256)]) @ texts.T  # (images, every scene)
    captions = []
    for row, prompt in enumerate(prompts):
        scene = parse_prompt(prompt)
        for _ in range(sweeps):
            for attribute in ATTRIBUTES:
                options = [replace(scene, **{attribute: v}) for v in VALUES[attribute]]
                options = [o for o in options if o == scene or o not in heldout]
                scene = max(options, key=lambda o: fit[row, column[o]].item())
        captions.append(scene.prompt)
    return captions


def dcpo_captions(args) -> None:
    import random

    import pandas as pd

    from diffalign.paths import asset
    from tools.toy.preference_data import loser_caption
    from tools.toy.render import parse_prompt, perturb

    path = Path(args.pairs) if args.pairs else asset("toy-data") / args.model / "pairs.parquet"
    if not path.is_file():
        raise SystemExit(f"dcpo-captions: no pairs at {path}: pass --model toy-sd or toy-flow, or --pairs FILE")
    pairs = pd.read_parquet(path)
    prompts = pairs["caption"].tolist()
    if args.captions == "same":
        pairs["caption_0"], pairs["caption_1"] = prompts, prompts
    elif args.captions == "paraphrase":  # what toy-flow's shipped caption_1 is (seed 0)
        pairs["caption_0"] = prompts
        pairs["caption_1"] = [loser_caption(p, "paraphrase", seed=args.seed) for p in prompts]
    elif args.captions == "edit":  # the winner keeps the prompt; the loser's gets one attribute changed
        pairs["caption_0"] = prompts
        pairs["caption_1"] = [perturb(parse_prompt(p), random.Random(f"{args.seed}:{p}")).prompt for p in prompts]
    else:
        for column in ("0", "1"):
            images01 = png_tensors(pairs[f"jpg_{column}"]).float() / 255
            pairs[f"caption_{column}"] = describe(images01, prompts, asset("toy-reward"))
    pairs.to_parquet(args.output)
    changed = [(pairs[c] != pairs["caption"]).mean() for c in ("caption_0", "caption_1")]
    print(f"{len(pairs)} pairs with {args.captions} captions written to {args.output} "
          f"(differ from the prompt: winner {changed[0]:.0%}, loser {changed[1]:.0%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=["headroom", "sensitivity", "branches", "guidance", "samplers",
                                           "drawn-pairs", "dcpo-captions", "paraphrase"])
    parser.add_argument("--model", default="toy-sd")
    parser.add_argument("--lora", help="a trained LoRA folder (needed by branches and guidance; optional for headroom and sensitivity)")
    parser.add_argument("--num-images", type=int, default=2, help="images per held-out prompt")
    parser.add_argument("--max-prompts", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--num-inference-steps", type=int, default=20,
                        help="sampling steps (20: the data's and the quickstart's)")
    parser.add_argument("--scales", default="2,3,4,6,8")
    parser.add_argument("--noise", type=float, default=0.01, help="sensitivity: noise in units of each weight's std")
    parser.add_argument("--output", help="drawn-pairs, dcpo-captions: the parquet file to write")
    parser.add_argument("--pairs", help="dcpo-captions: the pairs file to re-caption (default: the shipped pairs of --model)")
    parser.add_argument("--captions", choices=["same", "paraphrase", "edit", "described"], default="paraphrase",
                        help="dcpo-captions: which captions to write")
    parser.add_argument("--attention-only", action="store_true",
                        help="sensitivity: perturb only the attention projections, the weights a LoRA adapts")
    args = parser.parse_args()
    if args.probe in ("drawn-pairs", "dcpo-captions") and not args.output:
        parser.error(f"{args.probe} needs --output: the parquet file to write")
    if args.probe in ("branches", "guidance") and not args.lora:
        parser.error(f"{args.probe} needs --lora: a folder that `diffalign train` wrote")
    probes = {"headroom": headroom, "sensitivity": sensitivity, "branches": branches, "guidance": guidance,
              "samplers": samplers, "drawn-pairs": drawn_pairs, "dcpo-captions": dcpo_captions,
              "paraphrase": paraphrase}
    probes[args.probe](args)


if __name__ == "__main__":
    main()
