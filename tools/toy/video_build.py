"""`python -m tools.toy.video_build`: rebuild the toy video world's assets, on the CPU, seeded.

    python -m tools.toy.video_build                          # both, in order
    python -m tools.toy.video_build --only toy-video         # the generator (assets/toy-video)
    python -m tools.toy.video_build --only toy-video-data    # preference data (assets/toy-data/toy-video)

The rewards need nothing built: toy-video-reward and toy-video-judge run the shipped toy-reward
and toy-judge on each frame (rewards/toy_video.py). Metrics land in <work>/metrics/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from diffalign.errors import DiffalignError

BUILDERS = ("toy-video", "toy-video-data")


def build(only: list[str], out: Path, work: Path, smoke: bool = False, vae_stage_1: Path | None = None) -> dict:
    from dataclasses import replace

    from tools.toy import video_data, video_generator

    unknown = [n for n in only if n not in BUILDERS]
    if unknown:
        raise DiffalignError(f"unknown toy video builder(s) {unknown}: choose from {', '.join(BUILDERS)}")
    (work / "metrics").mkdir(parents=True, exist_ok=True)
    results = {}
    for name in [b for b in BUILDERS if b in only]:
        start = time.time()
        print(f"== building {name}", flush=True)
        if name == "toy-video":
            spec = video_generator.VideoGeneratorSpec(vae_stage_1=str(vae_stage_1) if vae_stage_1 else None)
            if smoke:
                spec = replace(spec, vae_steps=2, vae_steps_2=2, steps=2, renders_per_scene=1)
            results[name] = video_generator.train_toy_video(out / "toy-video", work, spec)
        else:
            if not (out / "toy-video" / "model_index.json").is_file():
                raise DiffalignError(f"{out / 'toy-video'} is missing: build it first with --only toy-video")
            spec = video_data.VideoDataSpec()
            if smoke:
                spec = replace(spec, num_prompts=4, heldout_prompts=2, candidates=2)
            results[name] = video_data.build_video_data(out / "toy-video", out / "toy-data" / "toy-video", spec)
        results[name + "_seconds"] = round(time.time() - start, 1)
        (work / "metrics" / f"{name}.json").write_text(json.dumps(
            {"metrics": results[name], "seconds": results[name + "_seconds"], "device": "cpu"}, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    from diffalign.paths import assets_dir

    parser = argparse.ArgumentParser(prog="python -m tools.toy.video_build", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(BUILDERS), help=f"comma-separated subset of {', '.join(BUILDERS)}")
    parser.add_argument("--out", type=Path, default=None, help="assets folder (default: the package's assets/)")
    parser.add_argument("--work", type=Path, default=Path("build/toy-video"), help="intermediate files and metrics")
    parser.add_argument("--smoke", action="store_true", help="two steps of everything: a plumbing check")
    parser.add_argument("--vae-stage-1", type=Path, default=None,
                        help="a VAE folder from an earlier build, to skip the VAE's first stage (same result)")
    args = parser.parse_args(argv)
    try:
        only = [n.strip() for n in args.only.split(",") if n.strip()]
        print(json.dumps(build(only, args.out or assets_dir(), args.work, args.smoke, args.vae_stage_1), indent=2))
    except DiffalignError as err:
        print(f"python -m tools.toy.video_build: error: {err}")
        return 2
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
