"""`diffalign <command>`: a flat dict from sub-command to the module that implements it.

Each module exposes `add_arguments(parser)` and `run(args) -> int`. Modules are imported only
when their command runs, so `diffalign --help` stays fast and heavy imports stay lazy. Every
command spells a shared concept the same way (`--output-dir`, `--num-inference-steps`,
`--guidance-scale`, `--dtype fp32|fp16|bf16`, `--reward SPEC`, ...) and reads its inputs through
`diffalign.edges`; docs/cli.md lists every flag (`python tools/cli_docs.py` writes it).
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
    "score": ("diffalign.score", "score images with one or several reward models"),
    "reno": ("diffalign.reno", "optimise the initial noise of a few-step pipeline against rewards"),
    "label": ("diffalign.label", "build synthetic preference data: generate K images a prompt and rank them"),
    "cache": ("diffalign.cache", "encode a dataset's latents and text embeddings to disk once"),
    "captions": ("diffalign.captions", "add DCPO dual captions (one per image) to preference pairs or ranked lists"),
    "train-spm": ("diffalign.train_spm", "train SPO's step-aware preference model on pairs noised through a base model"),
}


def build_parser(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, str | None]:
    """The `diffalign` parser and the command named in `argv`. Only that command's module is
    imported to declare its flags; with argv None every command's flags are declared (docs)."""
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
    wanted = next((a for a in argv if a in COMMANDS), None) if argv is not None else None
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", help="show full tracebacks")
        if argv is None or name == wanted:
            importlib.import_module(module_name).add_arguments(p)
    return parser, wanted


def command_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """{command: its sub-parser} of a parser from `build_parser`."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


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
