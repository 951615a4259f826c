"""DCPO caption strategies: rule-based perturbation, captioner/paraphraser models, files."""

import io
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diffalign import captions as cap
from diffalign.cli import main
from diffalign.errors import DiffalignError


def png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(buf, format="PNG")
    return buf.getvalue()


def colour_captioner(images):
    """A stand-in captioner: names the colour of the top-left pixel."""
    names = {(255, 0, 0): "red", (0, 0, 255): "blue", (0, 255, 0): "green"}
    return [f"a {names[img.getpixel((0, 0))]} square" for img in images]


def test_rule_perturbation_swaps_words_of_the_same_class():
    text = "two small red circles on the left"
    weak = cap.perturb_text(text, "weak", seed=0)
    assert weak != text and len(weak.split()) == len(text.split())
    changed = [(a, b) for a, b in zip(text.split(), weak.split()) if a != b]
    assert len(changed) == 1
    old, new = changed[0]
    same_class = [cap.COLOURS, cap.COUNTS, tuple(s + "s" for s in cap.SHAPES)]
    assert any(old in c and new in c for c in same_class) or cap.OPPOSITES.get(old) == new
    strong = cap.perturb_text(text, "strong", seed=0)
    assert sum(a != b for a, b in zip(text.split(), strong.split())) == 3
    assert cap.perturb_text(text, "strong", seed=0) == strong  # seeded
    assert cap.perturb_text("A dog at the Top", "weak") == "A dog at the Bottom"  # opposite, case kept
    # No known word: one content word is dropped.
    dropped = cap.perturb_text("a portrait of an astronaut", "weak")
    assert dropped in ("a of an astronaut", "a portrait of an")
    with pytest.raises(DiffalignError, match="strength"):
        cap.perturb_text(text, "extreme")


def test_rule_perturbation_keeps_count_and_noun_in_agreement():
    assert cap._agree_counts("one red circles and two blue square") == "one red circle and two blue squares"
    assert cap._agree_counts("One of the circles") == "One of the circles"  # not a count phrase
    for seed in range(40):  # counts and shapes edited at random: every result must agree
        for text in ("one small red circle on the left", "three large blue squares"):
            words = cap.perturb_text(text, "strong", seed=seed).split()
            count, noun = words[0], (words[-1] if text.startswith("three") else words[3])
            assert noun.endswith("s") == (count != "one"), (text, words)


def test_strategies_on_groups():
    groups = [{"prompt": "a square", "images": [png((255, 0, 0)), png((0, 0, 255))], "best": 0},
              {"prompt": "a tie", "images": [png((0, 255, 0)), png((255, 0, 0))], "best": None}]
    upper = lambda texts: [t.upper() for t in texts]
    assert cap.dual_captions(groups, "caption", captioner=colour_captioner) == [
        ["a red square", "a blue square"], ["a green square", "a red square"]]
    assert cap.dual_captions(groups, "perturb", perturber=upper) == [["a square", "A SQUARE"], ["a tie", "a tie"]]
    assert cap.dual_captions(groups, "hybrid", captioner=colour_captioner, perturber=upper) == [
        ["a red square", "A BLUE SQUARE"], ["a green square", "a red square"]]
    with pytest.raises(DiffalignError, match="captioner"):
        cap.dual_captions(groups, "hybrid")
    with pytest.raises(DiffalignError, match="at least 2 images"):
        cap.dual_captions([{"prompt": "x", "images": [png((0, 0, 0))], "best": 0}], "perturb")


def test_parquet_gets_caption_columns_and_loads_for_training(tmp_path):
    data = pytest.importorskip("diffalign.data")
    # label_0 = 0: the second image is the winner, so the first one's caption is perturbed.
    table = pa.table({"caption": ["two red circles", "a blue square"],
                      "jpg_0": [png((255, 0, 0)), png((0, 0, 255))], "jpg_1": [png((0, 0, 255)), png((255, 0, 0))],
                      "label_0": [0.0, 1.0], "label_1": [1.0, 0.0]})
    pq.write_table(table, tmp_path / "in.parquet")
    assert main(["captions", "--input", str(tmp_path / "in.parquet"), "--output-file", str(tmp_path / "out.parquet"),
                 "--strategy", "perturb", "--seed", "3"]) == 0
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert rows[0]["caption_1"] == "two red circles" and rows[0]["caption_0"] == cap.perturb_text("two red circles", seed=3)
    assert rows[1]["caption_0"] == "a blue square" and rows[1]["caption_1"] != "a blue square"
    ds = data.build_dataset(data.DataConfig(dataset=str(tmp_path / "out.parquet"), resolution=8, random_flip=False))
    first = ds[0]
    assert first["captions"] == [rows[0]["caption_1"], rows[0]["caption_0"]]  # winner first
    bad = tmp_path / "bad.parquet"
    pq.write_table(table.drop_columns(["jpg_1"]), bad)
    assert main(["captions", "--input", str(bad), "--output-file", str(tmp_path / "x.parquet"), "--strategy", "perturb"]) == 2


def test_jsonl_pairs_and_ranked_lists(tmp_path):
    for name, colour in (("r.png", (255, 0, 0)), ("b.png", (0, 0, 255)), ("g.png", (0, 255, 0))):
        (tmp_path / name).write_bytes(png(colour))
    lines = [{"prompt": "p1", "chosen": "r.png", "rejected": "b.png"},
             {"prompt": "p2", "images": ["g.png", "r.png", "b.png"], "scores": [0.2, 0.9, 0.1]}]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(line) for line in lines))
    cap.caption_jsonl(src, tmp_path / "out.jsonl", "hybrid", captioner=colour_captioner,
                      paraphraser=lambda texts: [t + " (changed)" for t in texts])
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert out[0]["chosen_caption"] == "a red square" and out[0]["rejected_caption"] == "a blue square (changed)"
    assert out[1]["captions"] == ["a green square (changed)", "a red square", "a blue square (changed)"]
    src.write_text(json.dumps({"prompt": "p", "images": ["g.png", "r.png"], "scores": [0.1, float("nan")]}))
    with pytest.raises(DiffalignError, match="finite"):
        cap.caption_jsonl(src, tmp_path / "o.jsonl", "perturb")


def test_tiny_transformers_captioner_and_paraphraser(tmp_path, clip_tokenizer_dir):
    from transformers import (BartConfig, BartForConditionalGeneration, BertTokenizer, BlipConfig,
                              BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor)

    torch.manual_seed(0)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "red", "blue", "square", "photo", "of"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(tmp_path / "vocab.txt"))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    blip = BlipForConditionalGeneration(BlipConfig(
        vision_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        text_config=dict(vocab_size=len(vocab), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, encoder_hidden_size=8, bos_token_id=5, pad_token_id=0,
                         sep_token_id=3, max_position_embeddings=32)))
    blip.save_pretrained(tmp_path / "blip")
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 16, "width": 16}),
                  tokenizer=tokenizer).save_pretrained(tmp_path / "blip")
    captioner = cap.load_captioner(str(tmp_path / "blip"), "cpu", max_new_tokens=4)
    images = [Image.new("RGB", (24, 24), (255, 0, 0)), Image.new("RGB", (24, 24), (0, 0, 255))]
    first = captioner(images)
    assert len(first) == 2 and all(isinstance(c, str) for c in first) and captioner(images) == first
    assert set(" ".join(first).split()) <= set(vocab)

    para_dir = shutil.copytree(clip_tokenizer_dir, tmp_path / "para")
    BartForConditionalGeneration(BartConfig(
        vocab_size=49408, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=64,
        pad_token_id=49407, bos_token_id=49406, eos_token_id=49407, decoder_start_token_id=49406)).save_pretrained(para_dir)
    paraphraser = cap.load_paraphraser(str(para_dir), "cpu", seed=1, max_new_tokens=5)
    texts = ["a red circle on the left", "two blue squares"]
    out = paraphraser(texts)
    assert out == paraphraser(texts) and all(o and o != t for o, t in zip(out, texts))
    with pytest.raises(DiffalignError, match="captioning model"):
        cap.load_captioner(str(tmp_path / "nowhere"))
