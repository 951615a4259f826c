"""Shrink the toy models' CLIP vocabulary to the words the toy world uses.

Every toy model carries a CLIP text tower, and CLIP's 49,408-token embedding table was most of
each asset's size (plus 1.5 MB of vocab.json + merges.txt per tokenizer), although the toy
prompts use about a hundred tokens. The models are still trained with the full tokenizer (so a
rebuild draws the same random numbers); on saving, `trim_text_folder` keeps:

- the 512 byte-level symbols (with and without `</w>`), so any text still tokenizes, letter by
  letter where a word was never seen (those rows were never trained either way),
- every merge the full CLIP BPE applies to a toy word, with its token, in the original order,
- `<|startoftext|>` and `<|endoftext|>`, last, as in CLIP.

Kept merges are a subset of CLIP's that contains every merge applied to a toy word, so BPE
takes the same steps on those words: each toy prompt gets the same tokens, now numbered in
the small vocabulary, and the sliced embedding rows give bit-identical text features.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import torch

from diffalign.errors import DiffalignError

SPECIALS = ("<|startoftext|>", "<|endoftext|>")
EMBEDDING_KEY = "embeddings.token_embedding.weight"  # "text_model." in front in a CLIPModel


def toy_texts() -> list[str]:
    """Every prompt of the toy world, the empty (unconditional) prompt and the edit words."""
    from tools.toy.render import all_scenes

    return [s.prompt for s in all_scenes()] + [""]


def words(text: str) -> list[str]:
    """CLIP's pre-tokenisation for plain lower-case text: letters runs, digits, punctuation."""
    return re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower())


def bpe_trace(word: str, ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """The merges CLIP's BPE applies to one word, in order (lowest rank first, as CLIP does)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    applied = []
    while len(parts) > 1:
        pairs = {(a, b) for a, b in zip(parts, parts[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        applied.append(best)
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return applied


@lru_cache(maxsize=1)
def trimmed_vocabulary() -> tuple[dict[str, int], list[str], list[int]]:
    """(vocab, merges, old_ids): the small vocabulary, its merges and, for each new id, the
    token's id in the full CLIP vocabulary."""
    from diffalign.rewards.clip_tokenizer import clip_vocab_and_merges

    full_vocab, full_merges = clip_vocab_and_merges()
    ranks = {tuple(m.split()): i for i, m in enumerate(full_merges)}
    used = set()
    for text in toy_texts():
        for word in words(text):
            used.update(bpe_trace(word, ranks))
    merges = [m for m in full_merges if tuple(m.split()) in used]  # original order = rank order
    base = [tok for tok, i in full_vocab.items() if i < 512]
    tokens = base + ["".join(m.split()) for m in merges] + list(SPECIALS)
    old_ids = [full_vocab[t] for t in tokens]
    return {t: i for i, t in enumerate(tokens)}, merges, old_ids


def write_tokenizer_files(folder: Path) -> None:
    vocab, merges, _ = trimmed_vocabulary()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def trim_text_folder(model_dir: Path, tokenizer_dir: Path) -> int:
    """Slice the token embedding of the transformers CLIP model saved in model_dir (a text
    encoder, or a full CLIPModel) to the toy vocabulary, fix its special-token ids and write the
    matching tokenizer files to tokenizer_dir. Already-trimmed folders are left as they are.
    Returns the new vocabulary size."""
    from safetensors.torch import load_file, save_file

    vocab, _, old_ids = trimmed_vocabulary()
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    text_config = config.get("text_config", config)
    weights_path = model_dir / "model.safetensors"
    if text_config["vocab_size"] != len(vocab):
        if text_config["vocab_size"] != 49408:
            raise DiffalignError(f"{model_dir}: vocab_size {text_config['vocab_size']} is neither CLIP's 49408 "
                                 f"nor the toy vocabulary's {len(vocab)}")
        state = load_file(weights_path)
        key = next((k for k in state if k.endswith(EMBEDDING_KEY)), None)
        if key is None:
            raise DiffalignError(f"{weights_path} has no CLIP token embedding ({EMBEDDING_KEY})")
        state[key] = state[key][torch.tensor(old_ids)].contiguous()
        save_file(state, weights_path, metadata={"format": "pt"})
        text_config["vocab_size"] = len(vocab)
        text_config["bos_token_id"] = vocab[SPECIALS[0]]
        text_config["eos_token_id"] = text_config["pad_token_id"] = vocab[SPECIALS[1]]
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_tokenizer_files(tokenizer_dir)
    return len(vocab)


def trim_asset(folder: Path) -> list[str]:
    """Trim every CLIP text tower of one toy asset folder (a diffusers pipeline or a
    PickScore-layout CLIPModel). Returns the trimmed sub-folders."""
    done = []
    if (folder / "model_index.json").is_file():
        for encoder, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            if (folder / encoder / "config.json").is_file():
                trim_text_folder(folder / encoder, folder / tokenizer)
                done.append(encoder)
    elif (folder / "config.json").is_file():
        trim_text_folder(folder, folder)
        done.append(".")
    return done
