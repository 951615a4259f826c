"""VideoReward port on a tiny random Qwen2-VL (real patch sizes, tiny widths); video files and
frame folders against the original's fetch_video (decord frames, torchvision uint8 resize).

The release is written the way VideoAlign saves it: model_config.json + checkpoint-<step>/ with
either model.pth (the PEFT-wrapped full state dict, transformers 4.45 key layout) or
adapter_model.safetensors + adapter_config.json + non_lora_state_dict.pth over a base model
folder. The reference score runs the *unmerged* PEFT model on inputs built by transformers'
own Qwen2VLProcessor (chat template, <|video_pad|> expansion, video patches), gathers the three
reward-token rows by hand, normalises and sums: nothing of diffalign's forward is reused."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from diffalign.errors import DiffalignError
from diffalign.rewards.videoreward import PROMPT_TEMPLATE, REWARD_TOKENS, VideoRewardReward, sample_frame_count, smart_resize

QWEN2VL_CHAT_TEMPLATE = (  # Qwen2-VL-2B-Instruct tokenizer_config.json
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>"]
NORM = {"VQ_mean": 0.3, "VQ_std": 1.5, "MQ_mean": -0.2, "MQ_std": 0.8, "TA_mean": 0.1, "TA_std": 2.0}
LORA_R, LORA_ALPHA = 4, 8
PROMPTS = ["a red fox runs", "a slow pan over a quiet lake at dawn"]


def stand_in_vocab_and_merges(num_merges=1000):
    """A byte-level BPE with Qwen2's pre-tokenizer, its merges learnt on the rubric prompt so the
    ~4000-character prompt is a few hundred tokens (keeps the tiny model's tests fast)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    probe = __import__("transformers").Qwen2Tokenizer(vocab={"<|endoftext|>": 0}, merges=[])
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = probe.backend_tokenizer.pre_tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe.train_from_iterator([PROMPT_TEMPLATE], trainers.BpeTrainer(vocab_size=len(alphabet) + num_merges, initial_alphabet=alphabet, show_progress=False))
    spec = json.loads(bpe.to_str())["model"]
    return spec["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]


def write_base_model(folder):
    """Stand-in for Qwen2-VL-2B-Instruct: a small Qwen2 BPE tokenizer and a tiny config whose
    vocab_size exceeds the tokenizer (the release shrinks 151936 rows to 151660)."""
    from transformers import Qwen2Tokenizer, Qwen2VLConfig

    vocab, merges = stand_in_vocab_and_merges()
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS})
    tok.save_pretrained(folder)
    ids = tok.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|endoftext|>"])
    text = dict(vocab_size=len(tok) + 37, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=8192, rms_norm_eps=1e-6, bos_token_id=ids[4], eos_token_id=ids[4],
                rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e6})
    vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids[0], video_token_id=ids[1],
                           vision_start_token_id=ids[2], vision_end_token_id=ids[3], tie_word_embeddings=True)
    config.save_pretrained(folder)
    return config


def to_old_layout(state):
    """transformers 5 keys -> the 4.45 keys VideoAlign saved (visual./model. at the top)."""
    out = {}
    for key, value in state.items():
        key = key.replace("base_model.model.model.language_model.", "base_model.model.model.")
        out[key.replace("base_model.model.model.visual.", "base_model.model.visual.")] = value
    return out


def build_trained_model(base_dir, config, seed, output_dim):
    """What create_model_and_processor + training produce: base Qwen2-VL, reward tokens added and
    embeddings resized, rm_head (output_dim 3), LoRA on the LLM linears (not visual/lm_head/rm_head)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    vlm = Qwen2VLForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
    vlm.resize_token_embeddings(len(tok))
    vlm.rm_head = nn.Linear(config.text_config.hidden_size, output_dim, bias=False)
    targets = [n for n, m in vlm.model.language_model.named_modules() if isinstance(m, nn.Linear)]
    peft_model = get_peft_model(vlm, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=targets))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():  # "training": LoRA, vision tower, embeddings, head
            if "lora_" in name or "visual" in name or "embed_tokens" in name or "rm_head" in name:
                p.normal_(0, 0.3 if "rm_head" in name else 0.1)
            elif "base_layer" in name:  # freeze_llm=False: the LLM's own weights train too
                p.add_(torch.randn_like(p) * 0.02)
    return peft_model.eval(), tok


def write_release(folder, layout, seed=0, output_dim=3):
    base_dir = folder / "base"
    config = write_base_model(base_dir)
    torch.manual_seed(seed + 100)
    from transformers import Qwen2VLForConditionalGeneration

    Qwen2VLForConditionalGeneration(config).save_pretrained(base_dir)  # the "pretrained" base weights
    peft_model, tok = build_trained_model(base_dir, config, seed, output_dim)
    ckpt = folder / "checkpoint-120"
    ckpt.mkdir(parents=True)
    (folder / "checkpoint-40").mkdir()  # an older step: the newest must win
    state = to_old_layout(peft_model.state_dict())
    if layout == "full":
        torch.save(state, ckpt / "model.pth")
    else:
        from safetensors.torch import save_file

        lora = {k.replace(".default", ""): v.contiguous() for k, v in state.items() if "lora_" in k}
        save_file(lora, str(ckpt / "adapter_model.safetensors"))
        # get_peft_state_non_lora_maybe_zero_3: every trainable non-LoRA parameter (named_parameters
        # lists the tied lm_head once, as embed_tokens); with freeze_llm=False that is all of them
        trainable = to_old_layout({k: v for k, v in peft_model.named_parameters() if "lora_" not in k})
        torch.save({k: v.detach().clone() for k, v in trainable.items()}, ckpt / "non_lora_state_dict.pth")
        (ckpt / "adapter_config.json").write_text(json.dumps({"r": LORA_R, "lora_alpha": LORA_ALPHA, "use_rslora": False}))
    model_config = {
        "data_config": {"meta_data": "x.csv", "data_dir": "x", "max_frame_pixels": 200704, "num_frames": None, "fps": 2.0,
                        "eval_dim": ["VQ", "MQ", "TA"], "prompt_template_type": "detailed_special", "sample_type": "uniform"},
        "training_args": {"output_dir": "rm_output"},
        "model_config": {"model_name_or_path": "base", "output_dim": output_dim, "use_special_tokens": True, "reward_token": "special"},
        "peft_lora_config": {"lora_enable": True, "lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "use_rslora": False},
        "inference_config": NORM,
    }
    (folder / "model_config.json").write_text(json.dumps(model_config))
    return peft_model, tok


def reference_dimensions(peft_model, tok, frames_255, prompts):
    """The original scoring: processor(chat template + video) -> reward model -> special rows."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                                 chat_template=QWEN2VL_CHAT_TEMPLATE)
    chats = [[{"role": "user", "content": [{"type": "video", "video": "v.mp4"},
                                            {"type": "text", "text": PROMPT_TEMPLATE.format(text_prompt=p)}]}] for p in prompts]
    text = processor.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
    batch = processor(text=text, videos=list(frames_255), padding=True, return_tensors="pt",
                      videos_kwargs={"do_rescale": True, "do_resize": False, "cap_pixels_per_frame": False})
    model = peft_model.base_model.model
    ids = batch.input_ids
    embeds = model.model.language_model.embed_tokens(ids)
    video = model.model.visual(batch.pixel_values_videos, grid_thw=batch.video_grid_thw).pooler_output
    embeds = embeds.clone()
    embeds[ids == model.config.video_token_id] = video
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=batch.attention_mask).last_hidden_state
    logits = model.rm_head(hidden)
    out = {}
    for d, (dim, token) in enumerate(zip(("VQ", "MQ", "TA"), REWARD_TOKENS)):
        token_id = tok.convert_tokens_to_ids(token)
        column = d if logits.shape[-1] == 3 else 0  # output_dim 3: one head per token; 1: a shared head
        raw = torch.stack([logits[b, (ids[b] == token_id).nonzero()[0, 0], column] for b in range(len(prompts))])
        out[dim] = (raw - NORM[f"{dim}_mean"]) / NORM[f"{dim}_std"]
    out["Overall"] = out["VQ"] + out["MQ"] + out["TA"]
    return out


@pytest.fixture(scope="module")
def full_release(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videoreward_full")
    peft_model, tok = write_release(folder, "full")
    return folder, peft_model, tok


@pytest.fixture(scope="module")
def reward(full_release):
    return VideoRewardReward.from_pretrained(full_release[0])


def aligned_videos(batch=2, frames=2, seed=0):
    """Frames already 308x336 (multiples of 28, >= 128*28*28 px) and on the uint8 grid, so the
    original's uint8 resize is the identity and both sides see the same pixels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, frames, 3, 308, 336), generator=g).float() / 255


def test_full_checkpoint_matches_original_formula(reward, full_release):
    _, peft_model, tok = full_release
    videos = aligned_videos()
    got = reward.score_dimensions(videos, PROMPTS)
    with torch.no_grad():
        want = reference_dimensions(peft_model, tok, videos * 255, PROMPTS)
    for dim in ("VQ", "MQ", "TA", "Overall"):
        assert got[dim].dtype == torch.float32 and got[dim].shape == (2,)
        torch.testing.assert_close(got[dim], want[dim], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(reward.score(videos, PROMPTS), want["Overall"], atol=1e-4, rtol=1e-4)
    assert reward.vlm.model.language_model.embed_tokens.weight.shape[0] == len(tok)  # shrunk to the tokenizer
    assert not any(p.requires_grad for p in reward.parameters()) and not reward.training


def test_adapter_checkpoint_with_one_output_matches_original_formula(tmp_path):
    peft_model, tok = write_release(tmp_path, "adapter", seed=3, output_dim=1)
    reward = VideoRewardReward.from_pretrained(tmp_path, use_norm=True)
    videos = aligned_videos(batch=1, seed=4)
    with torch.no_grad():
        want = reference_dimensions(peft_model, tok, videos * 255, PROMPTS[:1])
    torch.testing.assert_close(reward.score(videos, PROMPTS[:1]), want["Overall"], atol=1e-4, rtol=1e-4)


def test_gradient_and_batch_equals_single(reward):
    videos = aligned_videos(seed=5).requires_grad_(True)
    scores = reward.score(videos, PROMPTS)
    scores.sum().backward()
    assert torch.isfinite(videos.grad).all() and videos.grad[0].abs().sum() > 0 and videos.grad[1].abs().sum() > 0
    singles = torch.cat([reward.score(videos[i : i + 1].detach(), PROMPTS[i]) for i in range(2)])
    torch.testing.assert_close(scores.detach(), singles, atol=1e-5, rtol=1e-5)


def test_frame_sampling_and_resize_follow_vision_process():
    # 48 frames at 24 fps sampled at 2 fps -> 4 frames; the 4-frame minimum; odd totals
    assert sample_frame_count(48, 24.0, fps=2.0) == 4
    assert sample_frame_count(8, 24.0, fps=2.0) == 4
    assert sample_frame_count(5, 2.0, fps=2.0) == 4 and sample_frame_count(3, 2.0, fps=2.0) == 2
    assert sample_frame_count(20, 24.0, nframes=7) == 8
    # 60x76 is upscaled to >= 128*28*28 pixels: beta = sqrt(100352 / 4560), ceil to 28s
    assert smart_resize(60, 76, 28, 128 * 28 * 28, 200704) == (308, 364)
    # 720x1280 is capped at 448*448 pixels: beta = sqrt(921600 / 200704), 720 / beta = 336.0, floor to 28s
    assert smart_resize(720, 1280, 28, 128 * 28 * 28, 200704) == (336, 588)


def test_resize_matches_torchvision_uint8(reward):
    """Frames that need resizing: diffalign's float resize + rounding vs the original's uint8
    torchvision resize differ by at most one grey level."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    from diffalign.rewards.videoreward import resize_frames_uint8_like

    frames = torch.randint(0, 256, (2, 3, 60, 76), generator=torch.Generator().manual_seed(6)).to(torch.uint8)
    want = TF.resize(frames, [308, 364], interpolation=InterpolationMode.BICUBIC, antialias=True).float()
    got = resize_frames_uint8_like(frames.float(), 308, 364)
    assert (got - want).abs().max() <= 1.0 and (got != want).float().mean() < 0.05
    # end to end, such a clip still scores (and has its frames sampled from 2 fps -> 4 of 9)
    clip = frames.float()[None].repeat(1, 5, 1, 1, 1)[:, :9] / 255
    assert torch.isfinite(reward.score(clip, "a cat")).all()


def test_registry_and_options(reward, full_release):
    from diffalign.rewards import load_reward

    videos = aligned_videos(batch=1, seed=7)
    loaded = load_reward("videoreward", path=str(full_release[0]), use_norm=False)
    raw = loaded.score_dimensions(videos, "a cat")
    normed = reward.score_dimensions(videos, "a cat")
    for dim in ("VQ", "MQ", "TA"):  # use_norm=False gives the raw head outputs
        torch.testing.assert_close(normed[dim], (raw[dim] - NORM[f"{dim}_mean"]) / NORM[f"{dim}_std"], atol=1e-5, rtol=1e-5)
    with pytest.raises(DiffalignError, match="checkpoint-7 not in"):
        VideoRewardReward.from_pretrained(full_release[0], step=7)


def test_bad_input_and_missing_files(reward, tmp_path):
    with pytest.raises(DiffalignError, match="shape"):
        reward.score(torch.rand(2, 3, 64, 64), PROMPTS)  # an image batch, not videos
    with pytest.raises(DiffalignError, match="prompts"):
        reward.score(aligned_videos(batch=2), ["one"])
    with pytest.raises(DiffalignError, match="video file '.*clip.mp4' not found"):
        reward.score([str(tmp_path / "clip.mp4")], "a cat")
    with pytest.raises(DiffalignError, match="tensor or a list"):
        reward.score(str(tmp_path / "clip.mp4"), "a cat")
    with pytest.raises(DiffalignError, match="model_config.json"):
        VideoRewardReward.from_pretrained(tmp_path)
    with pytest.raises(DiffalignError, match="does not exist"):
        VideoRewardReward.from_pretrained(tmp_path / "nowhere")


def test_strict_loading_reports_keys(full_release, tmp_path):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(full_release[0], folder)
    state = torch.load(folder / "checkpoint-120" / "model.pth", weights_only=True)
    state.pop("base_model.model.rm_head.weight")
    state["base_model.model.extra.weight"] = torch.zeros(1)
    torch.save(state, folder / "checkpoint-120" / "model.pth")
    with pytest.raises(DiffalignError, match=r"missing: rm_head\.weight.*unexpected: extra\.weight"):
        VideoRewardReward.from_pretrained(folder)


# ---------------------------------------------------------------------- video files and frame folders


def write_mp4(path, frames, fps):
    """(T, H, W, 3) uint8 -> an H.264 mp4 at `fps`, written with PyAV."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame.numpy(), format="rgb24")))
        container.mux(stream.encode())
    return path


def textured_frames(total, height, width, seed=0):
    """Smooth moving colour gradients (a codec keeps them close to the input)."""
    g = torch.Generator().manual_seed(seed)
    base_ = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 5, generator=g), size=(height, width), mode="bicubic")[0]
    t = torch.arange(total).view(-1, 1, 1, 1) / total
    frames = (base_[None] * 0.7 + 0.3 * t).clamp(0, 1)
    return (frames * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def original_fetch_video(path, fps, max_pixels):
    """vision_process.fetch_video as VideoAlign's inference calls it, with its default reader
    (decord; PyAV's rgb24 frames, as torchvision.read_video, when decord is missing): indices
    linspace(0, T-1, n).round() for n from the file's frame count and average fps, then
    torchvision's bicubic antialiased resize of the uint8 frames, as floats."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    try:
        import decord

        reader = decord.VideoReader(str(path))
        total, video_fps = len(reader), reader.get_avg_fps()
        read = lambda idx: torch.from_numpy(reader.get_batch(idx).asnumpy())  # noqa: E731
    except ImportError:
        import av

        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            video_fps = float(stream.average_rate)
            decoded = [torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(stream)]
        total = len(decoded)
        read = lambda idx: torch.stack([decoded[i] for i in idx])  # noqa: E731
    n = round(min(max(total / video_fps * fps, 4), (min(768, total) // 2) * 2) / 2) * 2
    idx = torch.linspace(0, total - 1, n).round().long().tolist()
    video = read(idx).permute(0, 3, 1, 2)
    h, w = smart_resize(video.shape[2], video.shape[3], 28, 128 * 28 * 28, max_pixels)
    return TF.resize(video, [h, w], interpolation=InterpolationMode.BICUBIC, antialias=True).float(), idx


def test_frame_indices_follow_the_fps_rule(reward, tmp_path):
    """37 flat frames at 12 fps, frame i of grey level 6 i: at 2 fps the model sees
    n = even(37 / 12 * 2 = 6.2) = 6 frames, at linspace(0, 36, 6).round() = 0, 7, 14, 22, 29, 36."""
    frames = (torch.arange(37) * 6).to(torch.uint8).view(-1, 1, 1, 1).expand(37, 64, 80, 3).contiguous()
    path = write_mp4(tmp_path / "flat.mp4", frames, 12)
    seen = reward.frames(path.absolute())  # a Path, as score() passes it
    assert seen.shape[0] == 6 and seen.shape[-2:] == smart_resize(64, 80, 28, 128 * 28 * 28, 200704)
    assert (seen.mean(dim=(1, 2, 3)) / 6).round().long().tolist() == [0, 7, 14, 22, 29, 36]
    assert original_fetch_video(path, 2.0, 200704)[1] == [0, 7, 14, 22, 29, 36]


def test_mp4_scores_as_the_original_and_as_its_frames(reward, full_release, tmp_path, monkeypatch):
    """A video path: the frames equal fetch_video's (decord + torchvision uint8 resize) exactly;
    the score equals the original processor-and-model score, and the score of the decoded frames
    passed as a tensor with their fps (exact=True; and the default path where no resize is needed)."""
    _, peft_model, tok = full_release
    clips = {"aligned.mp4": textured_frames(24, 308, 336, seed=1), "resized.mp4": textured_frames(13, 90, 124, seed=2)}
    for name, frames in clips.items():
        path = write_mp4(tmp_path / name, frames, 8)
        want_frames, idx = original_fetch_video(path, 2.0, 200704)
        assert len(idx) == (6 if name == "aligned.mp4" else 4)
        torch.testing.assert_close(reward.frames(path), want_frames, atol=0, rtol=0)
        with torch.no_grad():
            want = reference_dimensions(peft_model, tok, [want_frames], ["a red fox runs"])
        got = reward.score_dimensions([str(path)], "a red fox runs")
        for dim in ("VQ", "MQ", "TA", "Overall"):
            torch.testing.assert_close(got[dim], want[dim], atol=1e-4, rtol=1e-4)
        # the decoded frames (all of them) as a tensor at the file's 8 fps
        import av

        with av.open(str(path)) as container:
            decoded = torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)])
        tensor = (decoded.permute(0, 3, 1, 2).float() / 255)[None]
        monkeypatch.setattr(reward, "video_fps", 8.0)
        torch.testing.assert_close(reward.score(tensor, "a red fox runs", exact=True), got["Overall"], atol=1e-5, rtol=0)
        if name == "aligned.mp4":  # 308x336 needs no resize: the differentiable path is exact too
            torch.testing.assert_close(reward.score(tensor, "a red fox runs"), got["Overall"], atol=1e-5, rtol=0)
        monkeypatch.undo()


def test_frame_folder_follows_the_frame_list_path(reward, full_release, tmp_path):
    """A folder of frames = the original's list-of-images video: every frame (sorted by name),
    fetch_image's PIL resize to multiples of 28 (image minimum 4*28*28), padded to an even count."""
    import numpy as np
    from PIL import Image

    _, peft_model, tok = full_release
    frames = textured_frames(3, 60, 76, seed=3)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame.numpy()).save(folder / f"{i:03d}.png")
    (folder / "notes.txt").write_text("not a frame")
    resized = [Image.open(folder / f"{i:03d}.png").convert("RGB").resize((84, 56)) for i in range(3)]  # smart_resize(60, 76)
    want_frames = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() for im in resized + resized[-1:]])
    torch.testing.assert_close(reward.frames(folder), want_frames, atol=0, rtol=0)
    with torch.no_grad():
        want = reference_dimensions(peft_model, tok, [want_frames], ["a slow pan"])
    torch.testing.assert_close(reward.score([folder], "a slow pan"), want["Overall"], atol=1e-4, rtol=1e-4)


def test_bad_video_files_are_one_line_errors(reward, tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 garbage")
    for path, message in [(tmp_path / "broken.mp4", "cannot decode video .*broken.mp4.*corrupt"),
                          (tmp_path / "missing.mp4", "video file .*missing.mp4' not found"),
                          (tmp_path, "holds no .*png")]:
        with pytest.raises(DiffalignError, match=message) as err:
            reward.score([str(path)], "a cat")
        assert "\n" not in str(err.value)


def test_score_command_reads_videos_through_load_rows(full_release, tmp_path, capsys):
    """`diffalign score` keeps video files and frame folders as paths (checked on load) and
    images as PIL images; videoreward scores the paths as load_reward(...).score does."""
    from PIL import Image

    from diffalign.cli import main
    from diffalign.score import load_rows

    video = write_mp4(tmp_path / "clip.mp4", textured_frames(10, 64, 80, seed=4), 8)
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "still.png")
    rows = [{"prompt": "a", "image": str(video)}, {"prompt": "b", "image": str(tmp_path / "bad.mp4")},
            {"prompt": "c", "image": str(tmp_path / "still.png")}]
    with pytest.raises(DiffalignError, match="bad.mp4.*--skip-bad"):
        load_rows(rows, skip_bad=False)
    with pytest.warns(UserWarning, match="skipping .*bad.mp4"):
        kept, items = load_rows(rows, skip_bad=True)
    assert [r["prompt"] for r in kept] == ["a", "c"] and items[0] == str(video) and isinstance(items[1], Image.Image)
    out = tmp_path / "scores.jsonl"
    argv = ["score", "--reward", f"videoreward@{full_release[0]}", "--prompt", "a red fox runs", str(video)]
    assert main(argv + ["--output-file", str(out)]) == 0, capsys.readouterr().err
    got = json.loads(out.read_text().splitlines()[0])["videoreward"]
    want = VideoRewardReward.from_pretrained(full_release[0]).score([str(video)], "a red fox runs")
    assert abs(got - float(want)) < 1e-5
