"""Dual captions for DCPO (Saeidi et al., 2025, arXiv:2502.06023): one caption per image.

The paper's three strategies, as data tools:

- "caption" (DCPO-c): every image gets a caption from an image-to-text model of your choice
  (`--captioner`, a hub id or folder loaded with AutoProcessor + AutoModelForImageTextToText:
  BLIP, GIT, BLIP-2, LLaVA, ...; `--caption-prompt` is the text given to chat-style models).
- "perturb" (DCPO-p): the winner keeps the prompt; the loser gets a perturbed prompt. With
  `--paraphraser` (a seq2seq model: AutoTokenizer + AutoModelForSeq2SeqLM, e.g. a T5 paraphraser
  or DIPPER, input `--paraphrase-prefix` + text, seeded sampling) the perturbation is a
  paraphrase; an output equal to its input falls back to the rules below. Without one, the
  rule-based perturbation `perturb_text` is used.
- "hybrid" (DCPO-h, the paper's best): captions as in "caption", then the loser's caption is
  perturbed as in "perturb".

Rule-based perturbation (no model): words of a known class are replaced by another word of the
same class - colours (red -> blue), shapes (circles -> squares, plural kept), counts (two ->
three), sizes and spatial relations (small <-> large, left <-> right, top <-> bottom). The
strength sets the number of edits: weak 1, medium 2, strong 3 (loosely DIPPER's lexical
diversity 40/60/80 in the paper). A shape noun after a count is then made to agree with it
("one red circles" -> "one red circle"). Text with no such word loses one random content word
instead.
The random choices are seeded by (seed, text), so a rerun gives the same captions.

Files: a Pick-a-Pic schema parquet (caption, jpg_0, jpg_1, label_0[, label_1]) gets caption_0
and caption_1; JSONL pairs ({"prompt", "chosen", "rejected"}) get chosen_caption and
rejected_caption; JSONL ranked lists ({"prompt", "images", "scores"}) get "captions", every image
but the best counting as a loser. Ties (equal labels) are captioned but not perturbed.

    diffalign captions --input pairs.parquet --output-file pairs_dc.parquet --strategy hybrid \
        --captioner Salesforce/blip-image-captioning-base
    diffalign label ... --captions perturb          # the same, on freshly labelled pairs
"""

from __future__ import annotations

import argparse
import io
import json
import random
import re
from pathlib import Path
from typing import Any, Callable

from diffalign.edges import atomic_write_bytes, atomic_write_text, default_device
from diffalign.errors import DiffalignError

STRATEGIES = ("caption", "perturb", "hybrid")
STRENGTHS = {"weak": 1, "medium": 2, "strong": 3}

# Word classes for the rule-based perturbation. A word is replaced by another of its class.
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "black", "white", "gray", "brown")
SHAPES = ("circle", "square", "triangle", "star", "heart", "hexagon", "rectangle", "cube", "sphere", "cone")
COUNTS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
# Opposites: replaced by their partner, so the meaning flips rather than drifts.
OPPOSITES = {
    "small": "large", "large": "small", "big": "small", "tiny": "huge", "huge": "tiny",
    "left": "right", "right": "left", "top": "bottom", "bottom": "top",
    "above": "below", "below": "above", "front": "behind", "behind": "front",
    "inside": "outside", "outside": "inside", "day": "night", "night": "day",
}
STOPWORDS = {"a", "an", "the", "of", "on", "in", "at", "with", "and", "or", "to", "is", "are", "its", "his", "her"}
# Words that may stand between a count and its noun ("two small red circles").
ADJECTIVES = COLOURS + ("small", "large", "big", "tiny", "huge")

WORD = re.compile(r"[A-Za-z]+")
# "<count> [adjectives] <shape>[s]": group 1 the count, 2 the words between, 3 the singular noun.
COUNT_PHRASE = re.compile(
    rf"\b({'|'.join(COUNTS)})((?:\s+(?:{'|'.join(ADJECTIVES)}))*\s+)({'|'.join(SHAPES)})s?\b", re.IGNORECASE
)


# ----------------------------------------------------------------------------------------------
# Rule-based perturbation


def _replacement(word: str, rng: random.Random) -> str | None:
    """Another word of the same class, keeping a plural 's' and a capital; None if no class."""
    lower = word.lower()
    stem, plural = (lower[:-1], "s") if lower.endswith("s") and lower[:-1] in SHAPES else (lower, "")
    if lower in OPPOSITES:
        new = OPPOSITES[lower]
    else:
        for words in (COLOURS, SHAPES, COUNTS):
            if stem in words:
                new = rng.choice([w for w in words if w != stem]) + plural
                break
        else:
            return None
    return new.capitalize() if word[0].isupper() else new


def perturb_text(text: str, strength: str = "medium", seed: int = 0) -> str:
    """Change the meaning of `text` by word substitutions (see the module docstring)."""
    if strength not in STRENGTHS:
        raise DiffalignError(f"unknown perturbation strength {strength!r}: choose {', '.join(STRENGTHS)}")
    rng = random.Random(f"{seed}:{text}")
    words = list(WORD.finditer(text))
    candidates = [m for m in words if _replacement(m.group(), random.Random(0)) is not None]
    edits: dict[tuple[int, int], str] = {}
    if candidates:
        for m in rng.sample(candidates, min(STRENGTHS[strength], len(candidates))):
            edits[m.span()] = _replacement(m.group(), rng)
    else:
        content = [m for m in words if m.group().lower() not in STOPWORDS and len(m.group()) > 2]
        if len(words) >= 2 and content:
            edits[rng.choice(content).span()] = ""
    out = text
    for (start, end), new in sorted(edits.items(), reverse=True):  # right to left: spans stay valid
        out = out[:start] + new + out[end:]
    return _agree_counts(re.sub(r"\s{2,}", " ", out).strip())


def _agree_counts(text: str) -> str:
    """Make a shape noun agree with the count before it, so that an edited count does not leave
    "one red circles" or "two red circle" behind."""
    def agree(m: re.Match) -> str:
        plural = "" if m.group(1).lower() == "one" else "s"
        return m.group(1) + m.group(2) + m.group(3) + plural

    return COUNT_PHRASE.sub(agree, text)


def rule_perturber(strength: str = "medium", seed: int = 0) -> Callable[[list[str]], list[str]]:
    return lambda texts: [perturb_text(t, strength, seed) for t in texts]


# ----------------------------------------------------------------------------------------------
# Models: captioner and paraphraser


def load_captioner(model: str, device: str | None = None, prompt: str | None = None,
                   max_new_tokens: int = 40, batch_size: int = 8) -> Callable[[list[Any]], list[str]]:
    """An image-to-text model as `fn(list of PIL images) -> list of captions` (greedy decoding)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model)
        net = AutoModelForImageTextToText.from_pretrained(model).to(default_device(device)).eval()
    except (OSError, ValueError) as err:
        raise DiffalignError(f"cannot load captioning model {model!r} ({str(err).splitlines()[0]}): pass a hub id "
                             "or folder of an image-to-text model (HF_HUB_OFFLINE=0 to download)") from None

    def caption(images: list[Any]) -> list[str]:
        out = []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            kwargs = {"images": batch, "return_tensors": "pt"}
            if prompt is not None:
                kwargs["text"] = [prompt] * len(batch)
            inputs = processor(**kwargs).to(net.device)
            with torch.no_grad():
                ids = net.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            for text in processor.batch_decode(ids, skip_special_tokens=True):
                # Decoder-only VLMs echo the prompt before the answer.
                if prompt and text.startswith(prompt):
                    text = text[len(prompt):]
                out.append(text.strip())
        return out

    return caption


def load_paraphraser(model: str, device: str | None = None, prefix: str = "paraphrase: ", seed: int = 0,
                     strength: str = "medium", max_new_tokens: int = 60,
                     batch_size: int = 8) -> Callable[[list[str]], list[str]]:
    """A seq2seq paraphrasing model as `fn(texts) -> texts` (seeded nucleus sampling). Outputs
    equal to their input fall back to the rule-based perturbation, so the loser's caption always
    differs where the rules can change it."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
        net = AutoModelForSeq2SeqLM.from_pretrained(model).to(default_device(device)).eval()
    except (OSError, ValueError) as err:
        raise DiffalignError(f"cannot load paraphrasing model {model!r} ({str(err).splitlines()[0]}): pass a hub id "
                             "or folder of a seq2seq (text2text) model, or leave --paraphraser out for the rules") from None

    def paraphrase(texts: list[str]) -> list[str]:
        out = []
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            inputs = tokenizer([prefix + t for t in batch], return_tensors="pt", padding=True, truncation=True).to(net.device)
            torch.manual_seed(seed + start)  # sampling is seeded: a rerun gives the same captions
            with torch.no_grad():
                ids = net.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=True, top_p=0.9)
            for text, new in zip(batch, tokenizer.batch_decode(ids, skip_special_tokens=True)):
                new = new.strip()
                out.append(new if new and new.lower() != text.lower() else perturb_text(text, strength, seed))
        return out

    return paraphrase


# ----------------------------------------------------------------------------------------------
# Strategies over groups of images


def _to_pil(ref: Any, base_dir: Path | None = None):
    from PIL import Image

    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    if isinstance(ref, dict):  # a datasets Image feature
        ref = ref.get("bytes") or ref.get("path")
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(ref))).convert("RGB")
    path = Path(ref)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise DiffalignError(f"image {str(path)!r} not found: captioning needs the images; check the paths")
    return Image.open(path).convert("RGB")


def dual_captions(groups: list[dict[str, Any]], strategy: str, *, captioner: Callable | None = None,
                  perturber: Callable[[list[str]], list[str]] | None = None) -> list[list[str]]:
    """Captions for each group {"prompt", "images" (refs), "best" (index, or None for a tie)}.

    caption: captioner(image) for every image; perturb: the prompt, perturbed for every image
    but the best; hybrid: the captions, perturbed for every image but the best.
    """
    from tqdm.auto import tqdm

    if strategy not in STRATEGIES:
        raise DiffalignError(f"unknown caption strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if strategy in ("caption", "hybrid") and captioner is None:
        raise DiffalignError(f"strategy {strategy!r} needs a captioning model: pass --captioner HUB_ID_OR_PATH")
    for n, g in enumerate(groups):
        if not isinstance(g.get("prompt"), str) or len(g.get("images", [])) < 2:
            raise DiffalignError(f"group {n} needs a string prompt and at least 2 images: fix or drop it")
    if strategy == "perturb":
        captions = [[g["prompt"]] * len(g["images"]) for g in groups]
    else:
        captions = []
        for g in tqdm(groups, desc="caption", unit="group", disable=len(groups) < 10):
            pil = [_to_pil(ref, g.get("base_dir")) for ref in g["images"]]
            captions.append([c if c else g["prompt"] for c in captioner(pil)])
    if strategy == "caption":
        return captions
    perturber = perturber or rule_perturber()
    slots = [(n, i) for n, g in enumerate(groups) if g.get("best") is not None
             for i in range(len(g["images"])) if i != g["best"]]
    changed = perturber([captions[n][i] for n, i in slots])
    for (n, i), text in zip(slots, changed):
        captions[n][i] = text
    return captions


def _models(strategy, captioner, paraphraser, seed, device, strength, caption_prompt, paraphrase_prefix):
    """Load the models named by strings (only those the strategy uses); callables pass through."""
    if isinstance(captioner, str) and strategy in ("caption", "hybrid"):
        captioner = load_captioner(captioner, device, caption_prompt)
    perturber = rule_perturber(strength, seed)
    if isinstance(paraphraser, str) and strategy in ("perturb", "hybrid"):
        perturber = load_paraphraser(paraphraser, device, paraphrase_prefix, seed, strength)
    elif callable(paraphraser):
        perturber = paraphraser
    return captioner, perturber


def _winner(labels: list[float]) -> int | None:
    best = max(range(len(labels)), key=lambda i: labels[i])
    return None if all(v == labels[best] for v in labels) else best


def caption_pairs(records: list[dict[str, Any]], strategy: str, *, captioner: str | Callable | None = None,
                  paraphraser: str | Callable | None = None, seed: int = 0, device: str | None = None,
                  strength: str = "medium", caption_prompt: str | None = None,
                  paraphrase_prefix: str = "paraphrase: ") -> list[dict[str, Any]]:
    """Pick-a-Pic rows (caption, jpg_0, jpg_1, label_0[, label_1]) -> the same with caption_0/1."""
    captioner, perturber = _models(strategy, captioner, paraphraser, seed, device, strength, caption_prompt,
                                   paraphrase_prefix)
    groups = []
    for r in records:
        label_0 = float(r["label_0"])
        label_1 = float(r["label_1"]) if r.get("label_1") is not None else 1.0 - label_0
        groups.append({"prompt": r["caption"], "images": [r["jpg_0"], r["jpg_1"]], "best": _winner([label_0, label_1])})
    captions = dual_captions(groups, strategy, captioner=captioner, perturber=perturber)
    return [{**r, "caption_0": c[0], "caption_1": c[1]} for r, c in zip(records, captions)]


# ----------------------------------------------------------------------------------------------
# Files


def caption_parquet(src: Path, dst: Path, strategy: str, **opts: Any) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(src)
    missing = [c for c in ("caption", "jpg_0", "jpg_1", "label_0") if c not in table.column_names]
    if missing:
        raise DiffalignError(f"{src} has no column {', '.join(missing)}: the Pick-a-Pic schema needs "
                             "caption, jpg_0, jpg_1, label_0 (label_1 optional)")
    records = caption_pairs(table.to_pylist(), strategy, **opts)
    keep = [c for c in table.column_names if c not in ("caption_0", "caption_1")]
    out = table.select(keep).append_column("caption_0", pa.array([r["caption_0"] for r in records], pa.string()))
    out = out.append_column("caption_1", pa.array([r["caption_1"] for r in records], pa.string()))
    buffer = io.BytesIO()
    pq.write_table(out, buffer)
    atomic_write_bytes(dst, buffer.getvalue())
    return len(records)


def caption_jsonl(src: Path, dst: Path, strategy: str, *, captioner: str | Callable | None = None,
                  paraphraser: str | Callable | None = None, seed: int = 0, device: str | None = None,
                  strength: str = "medium", caption_prompt: str | None = None,
                  paraphrase_prefix: str = "paraphrase: ") -> int:
    rows = []
    for n, line in enumerate(src.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        obj = json.loads(line)
        if "images" in obj:
            scores = obj.get("scores")
            if not isinstance(scores, list) or len(scores) != len(obj["images"]) or not all(
                    isinstance(s, (int, float)) and s == s for s in scores):
                raise DiffalignError(f"line {n} of {src}: \"scores\" must be one finite number per image")
            rows.append((obj, obj["images"], _winner(scores)))
        elif "chosen" in obj and "rejected" in obj:
            rows.append((obj, [obj["chosen"], obj["rejected"]], 0))
        else:
            raise DiffalignError(f"line {n} of {src} has neither chosen/rejected nor images/scores: see docs/datasets.md")
    captioner, perturber = _models(strategy, captioner, paraphraser, seed, device, strength, caption_prompt,
                                   paraphrase_prefix)
    groups = [{"prompt": obj.get("prompt"), "images": images, "best": best, "base_dir": src.parent}
              for obj, images, best in rows]
    captions = dual_captions(groups, strategy, captioner=captioner, perturber=perturber)
    lines = []
    for (obj, _, _), caps in zip(rows, captions):
        if "images" in obj:
            obj = {**obj, "captions": caps}
        else:
            obj = {**obj, "chosen_caption": caps[0], "rejected_caption": caps[1]}
        lines.append(json.dumps(obj) + "\n")
    atomic_write_text(dst, "".join(lines))
    return len(rows)


# ----------------------------------------------------------------------------------------------
# CLI: diffalign captions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="Pick-a-Pic schema .parquet or .jsonl (pairs or ranked lists)")
    parser.add_argument("--output-file", required=True, help="where to write the same rows with per-image captions")
    parser.add_argument("--strategy", required=True, choices=STRATEGIES)
    parser.add_argument("--captioner", default=None, help="image-to-text model (hub id or folder)")
    parser.add_argument("--caption-prompt", default=None, help="text prompt for chat-style captioners")
    parser.add_argument("--paraphraser", default=None, help="seq2seq paraphrasing model (default: rule-based)")
    parser.add_argument("--paraphrase-prefix", default="paraphrase: ", help="text put before each input of --paraphraser")
    parser.add_argument("--perturb-strength", choices=tuple(STRENGTHS), default="medium",
                        help="rule-based perturbation: 1, 2 or 3 word edits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")


def run(args: argparse.Namespace) -> int:
    src, dst = Path(args.input), Path(args.output_file)
    opts = dict(captioner=args.captioner, paraphraser=args.paraphraser, seed=args.seed, device=args.device,
                strength=args.perturb_strength, caption_prompt=args.caption_prompt,
                paraphrase_prefix=args.paraphrase_prefix)
    if not src.is_file():
        raise DiffalignError(f"input {src} not found: pass a .parquet or .jsonl file")
    if src.suffix == ".parquet":
        n = caption_parquet(src, dst, args.strategy, **opts)
    elif src.suffix == ".jsonl":
        n = caption_jsonl(src, dst, args.strategy, **opts)
    else:
        raise DiffalignError(f"input {src} is neither .parquet nor .jsonl: convert it first")
    print(f"wrote {n} rows with {args.strategy} captions to {dst}")
    return 0
