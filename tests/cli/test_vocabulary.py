"""One flag vocabulary: docs/cli.md is what the parsers say, and no command spells a shared
concept two ways (tools/cli_docs.py holds the vocabulary and the spellings it replaced)."""

import argparse
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cli_docs():
    # tools/ sits beside the package and is not installed: import the script by its path.
    spec = importlib.util.spec_from_file_location("cli_docs", ROOT / "tools" / "cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_cli_md_is_current(cli_docs):
    assert (ROOT / "docs" / "cli.md").read_text() == cli_docs.render(), "run: python tools/cli_docs.py"
    assert cli_docs.main(["--check"]) == 0


def test_no_command_spells_a_shared_concept_two_ways(cli_docs):
    from diffalign.cli import COMMANDS

    parsers = cli_docs.command_parsers()
    assert list(parsers) == list(COMMANDS) and "captions" in parsers
    assert cli_docs.vocabulary_problems() == []
    for name, parser in parsers.items():
        flags = cli_docs.flags(parser)
        assert not flags & {"--output", "--steps", "--guidance", "--path", "--reward-path"}, name
    # every command that writes a folder, samples or scores uses the one spelling
    for flag, users in {"--output-dir": {"train", "train-spm", "eval", "label", "cache", "reno"},
                        "--num-inference-steps": {"train", "eval", "label", "reno"},
                        "--guidance-scale": {"train", "train-spm", "eval", "label", "reno"},
                        "--reward": {"train", "eval", "label", "reno", "score"},
                        "--dtype": {"eval", "label", "reno", "score", "cache"}}.items():
        assert {name for name, p in parsers.items() if flag in cli_docs.flags(p)} == users, flag


def test_the_vocabulary_check_finds_synonyms_and_old_dtype_names(cli_docs, monkeypatch):
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int)
    parser.add_argument("--dtype", default="float32")
    monkeypatch.setattr(cli_docs, "command_parsers", lambda: {"demo": parser})
    assert cli_docs.vocabulary_problems() == [
        "diffalign demo --steps: spell it --num-inference-steps",
        "diffalign demo --dtype: dtype names are fp32 | fp16 | bf16",
    ]
