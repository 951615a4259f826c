"""The family files keep their contract: one file per family with everything family-specific,
no family pipeline class named elsewhere in the product, and marked copies equal to their
originals (the diffusers `# Copied from` convention)."""

import ast
import importlib
import re
import textwrap
from pathlib import Path

import pytest

from diffalign.models import FAMILIES, FAMILY_TABLE, PIPELINE_FAMILIES, ModelAdapter, family_module, make_adapter
from diffalign.testing import tiny_pipeline

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = [ROOT / "diffalign", ROOT / "rewards", ROOT / "pipelines"]
FAMILY_FILE_NAMES = ["Adapter", "LORA_TARGETS", "save_lora_weights", "TINY_RESOLUTION", "TINY_VARIANTS", "tiny_pipeline"]
COPIED_FROM = re.compile(r"^(\s*)# Copied from (diffalign\.[\w.]+)\s*$")


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_file_defines_the_contract(family):
    module = family_module(family)
    missing = [name for name in FAMILY_FILE_NAMES if not hasattr(module, name)]
    assert not missing, f"diffalign/models/{family}.py lacks {missing}"
    options = next(iter(module.TINY_VARIANTS.values()))
    adapter = make_adapter(tiny_pipeline(family, **options))
    assert isinstance(adapter, ModelAdapter)  # every training and sampling piece of the contract
    assert adapter.family == family and type(adapter) is module.Adapter
    assert all(isinstance(name, str) for name in module.LORA_TARGETS)
    assert module.TINY_VARIANTS, "every family has at least one tiny variant"


def test_the_table_names_every_pipeline_class_once():
    names = [name for _, classes in FAMILY_TABLE.values() for name in classes]
    assert len(names) == len(set(names)) == len(PIPELINE_FAMILIES)
    for name in names:
        import diffusers

        assert hasattr(diffusers, name), f"{name} is not a diffusers pipeline class"


def test_no_product_file_outside_the_family_files_names_a_family_pipeline_class():
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, PIPELINE_FAMILIES)) + r")\b")
    offenders = []
    for folder in PRODUCT:
        for path in folder.rglob("*.py"):
            if (ROOT / "diffalign" / "models") in path.parents:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "family pipeline classes belong in diffalign/models/<family>.py:\n" + "\n".join(offenders)


def _first_line(node: ast.stmt) -> int:
    return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])


def _text(lines: list[str], node: ast.stmt) -> str:
    """A statement's source with its decorators, dedented."""
    return textwrap.dedent("\n".join(lines[_first_line(node) - 1 : node.end_lineno]))


def _name(node: ast.stmt) -> str | None:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return node.name
    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id
    return None


def _marked_copies() -> list[tuple[Path, int, str, str]]:
    """(file, line, target dotted name, copied source) for every `# Copied from` mark: the mark
    stands on the line above the copied def, class or assignment."""
    copies = []
    for path in (ROOT / "diffalign").rglob("*.py"):
        source = path.read_text()
        lines = source.splitlines()
        statements = {_first_line(n): n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.stmt)}
        for number, line in enumerate(lines, 1):
            match = COPIED_FROM.match(line)
            if match:
                assert number + 1 in statements, f"{path}:{number}: the mark must stand right above a definition"
                copies.append((path, number, match.group(2), _text(lines, statements[number + 1])))
    return copies


def _original(target: str) -> str:
    """The source of `diffalign.<module>.<Name>[.<attr>]` (a def, class or assignment)."""
    parts = target.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        source = Path(module.__file__).read_text()
        body: list[ast.stmt] = ast.parse(source).body
        for name in parts[split:]:
            node = next(n for n in body if _name(n) == name)
            body = getattr(node, "body", [])
        return _text(source.splitlines(), node)
    raise AssertionError(f"no module for {target}")


def test_marked_copies_equal_their_originals():
    copies = _marked_copies()
    assert copies, "the family files mark their shared pieces"
    for path, line, target, copy in copies:
        original = _original(target)
        assert copy == original, f"{path.relative_to(ROOT)}:{line} differs from {target}:\n{copy}\n---\n{original}"
