"""Code in the docs runs and does what its text says (on the tiny pipeline)."""

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def snippet(doc: str, section: str) -> str:
    """The first ```python block under `## section` of docs/<doc>."""
    text = (ROOT / "docs" / doc).read_text()
    body = text.split(f"## {section}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def test_best_of_n_regenerates_its_winner_as_the_docs_say(tiny_sd):
    from helpers import brightness

    code = snippet("pipelines.md", "Best-of-N")
    scope = {"pipe": tiny_sd, "reward": brightness, "torch": torch}
    exec(compile(code, "docs/pipelines.md (Best-of-N)", "exec"), scope)
    best, again = scope["best"], scope["again"]
    assert best.scores.shape == (16,) and best.seed == best.index  # seed 0: candidate i from seed i
    # The winner, drawn alone with the snippet's call, is the image best_of_n kept (up to batch rounding).
    torch.testing.assert_close(again, best.image, rtol=0, atol=1e-4)
    other = tiny_sd("a red bicycle", generator=torch.Generator().manual_seed(best.seed), output_type="pt").images[0]
    assert not torch.allclose(other, best.image, atol=1e-3)  # without the step count it would not reproduce
