"""`diffalign <command>`: a flat dict from sub-command to the module that implements it.

Each module exposes `add_arguments(parser)` and `run(args) -> int`. Modules are imported only
when their command runs, so `diffalign --help` stays fast and heavy imports stay lazy.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from diffalign.errors import DiffalignError

# name -> (module, one-line help)
COMMANDS = {
    "train": ("diffalign.train", "train a model with a preference objective (dpo, mapo, flow-dpo, sft, ...)"),
    "eval": ("diffalign.evaluate", "generate with a model and a baseline, score both, report the win rate"),
    "score": ("diffalign.rewards.cli", "score images with one or several reward models"),
    "reno": ("diffalign.reno", "optimise the initial noise of a few-step pipeline against rewards"),
    "label": ("diffalign.label", "build synthetic preference data: generate K images a prompt and rank them"),
    "cache": ("diffalign.cache", "encode a dataset's latents and text embeddings to disk once"),
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, str | None]:
    from diffalign import __version__

    parser = argparse.ArgumentParser(
        prog="diffalign",
        description="Align diffusion and flow-matching generators with human preferences.",
        epilog="`diffalign COMMAND --help` lists a command's options. With no --model/--dataset, "
        "`diffalign train --method mapo` runs the toy quickstart.",
    )
    parser.add_argument("--version", action="version", version=f"diffalign {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if a in COMMANDS), None)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", help="show full tracebacks")
        # Only the chosen command's module is imported to declare its flags.
        if name == wanted:
            importlib.import_module(module_name).add_arguments(p)
    return parser, wanted


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser, wanted = build_parser(argv)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        module = importlib.import_module(COMMANDS[args.command][0])
        return int(module.run(args) or 0)
    except DiffalignError as err:
        if debug:
            raise
        print(f"diffalign: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffalign: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
