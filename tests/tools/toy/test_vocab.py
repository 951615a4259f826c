"""The toy vocabulary: trimming CLIP's embedding table must not change a single toy feature."""

import json

import pytest
import torch

from diffalign.paths import asset
from tools.toy import vocab as V


def full_clip_ids(tokenizer_dir, texts):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tokenizer_dir)(texts, padding="max_length", max_length=77,
                                                       return_tensors="pt").input_ids


def test_bpe_trace_merges_a_word_into_the_token_clip_has_for_it():
    from diffalign.rewards.clip_tokenizer import clip_vocab_and_merges

    vocab, merges = clip_vocab_and_merges()
    ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
    for word in ("circle", "background", "purple"):  # words CLIP has one token for
        applied = V.bpe_trace(word, ranks)
        assert "".join(applied[-1]) == word + "</w>"
        assert word + "</w>" in vocab


def test_trimmed_vocabulary_keeps_bytes_and_specials_and_is_small():
    vocab, merges, old_ids = V.trimmed_vocabulary()
    assert len(vocab) == 512 + len(merges) + 2 < 1000
    assert list(vocab)[-2:] == list(V.SPECIALS)
    assert old_ids[:512] == list(range(512)) and old_ids[-2:] == [49406, 49407]
    assert old_ids == sorted(old_ids)  # original order, so BPE ranks are unchanged


def test_trimmed_text_encoder_gives_identical_features_on_every_toy_prompt(tmp_path):
    """A random CLIP text tower saved with the full vocabulary, trimmed in place: same features."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from diffalign.rewards.clip_tokenizer import write_clip_tokenizer

    full_tok = write_clip_tokenizer(tmp_path / "full")
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, bos_token_id=49406, eos_token_id=49407,
                                         pad_token_id=49407)).eval()
    model.save_pretrained(tmp_path / "enc")
    texts = V.toy_texts()[::7] + [""]
    ids = full_clip_ids(full_tok, texts)
    with torch.no_grad():
        before = model(ids)

    assert V.trim_text_folder(tmp_path / "enc", tmp_path / "enc") == len(V.trimmed_vocabulary()[0])
    small = CLIPTextModel.from_pretrained(tmp_path / "enc").eval()
    small_ids = CLIPTokenizer.from_pretrained(tmp_path / "enc")(texts, padding="max_length", max_length=77,
                                                                return_tensors="pt").input_ids
    assert torch.equal(torch.tensor(V.trimmed_vocabulary()[2])[small_ids], ids)
    with torch.no_grad():
        after = small(small_ids)
    assert torch.equal(before.last_hidden_state, after.last_hidden_state)
    assert torch.equal(before.pooler_output, after.pooler_output)  # found the <|endoftext|> by its new id
    # a word the toy world never uses still tokenizes (letter by letter), without an unknown token
    unseen = CLIPTokenizer.from_pretrained(tmp_path / "enc")("zebra").input_ids
    assert len(unseen) > 3 and all(i < 512 or i >= len(V.trimmed_vocabulary()[0]) - 2 for i in unseen)
    # trimming twice is a no-op
    V.trim_text_folder(tmp_path / "enc", tmp_path / "enc")
    assert json.loads((tmp_path / "enc" / "config.json").read_text())["vocab_size"] == len(V.trimmed_vocabulary()[0])


@pytest.mark.parametrize("folder", ["toy-sd/tokenizer", "toy-flow/tokenizer_2", "toy-reward", "toy-judge"])
def test_shipped_tokenizers_give_every_toy_prompt_its_full_clip_tokens(folder, tmp_path):
    from transformers import CLIPTokenizer

    from diffalign.rewards.clip_tokenizer import write_clip_tokenizer

    texts = V.toy_texts()
    shipped = CLIPTokenizer.from_pretrained(asset(folder))(texts, padding="max_length", max_length=77,
                                                          return_tensors="pt").input_ids
    full = full_clip_ids(write_clip_tokenizer(tmp_path / "full"), texts)
    assert torch.equal(torch.tensor(V.trimmed_vocabulary()[2])[shipped], full)
