"""diffalign.edges: one loader, one dtype spelling, one prompt reader, one reward grammar, one
atomic writer; bad input fails on one line before any model loads."""

import json
import re
import sys
import types

import pytest
import torch

from diffalign import edges
from diffalign.edges import RewardSpec, parse_dtype, parse_reward_specs, read_prompts, sampling_defaults
from diffalign.errors import DiffalignError
from diffalign.rewards import REWARDS, register_reward


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


@pytest.fixture()
def user_module(monkeypatch):
    """A user's reward module, importable as edges_user_rewards:redness."""
    module = types.ModuleType("edges_user_rewards")
    module.redness = lambda images, prompts: images[:, 0].mean(dim=(1, 2))
    module.not_a_function = 3
    monkeypatch.setitem(sys.modules, "edges_user_rewards", module)
    return module


@pytest.fixture()
def no_model_loads(monkeypatch):
    """Any pipeline load fails the test: errors must come before it."""
    from diffusers import DiffusionPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", refuse)


# ------------------------------------------------------------------------------------- dtypes


def test_dtype_names_are_fp32_fp16_bf16_only():
    assert parse_dtype("fp32") is torch.float32 and parse_dtype("fp16") is torch.float16
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(torch.float16) is torch.float16
    with pytest.raises(DiffalignError, match=r"unknown dtype 'float32': use one of fp32 \| fp16 \| bf16"):
        parse_dtype("float32")


# ------------------------------------------------------------------------------------ prompts


def test_prompt_files_of_every_kind(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n\n  two blue squares \n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a red circle"}\n\n{"prompt": "two blue squares", "id": 2}\n')
    (tmp_path / "p.json").write_text(json.dumps(["a red circle", "two blue squares"]))
    for name in ("p.txt", "p.jsonl", "p.json"):
        assert read_prompts(tmp_path / name) == ["a red circle", "two blue squares"]
        assert read_prompts(str(tmp_path / name)) == ["a red circle", "two blue squares"]
    from diffalign.paths import asset

    shipped = (asset("toy-data") / "prompts_heldout.txt").read_text().splitlines()
    assert read_prompts("toy") == [line for line in shipped if line.strip()] and len(shipped) > 10


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "not found"),
    ("empty.txt", "\n \n", "no prompts"),
    ("bad.jsonl", '{"prompt": "ok"}\n{"text": "no prompt key"}\n', "line 2 .* no string \"prompt\""),
    ("broken.jsonl", "not json\n", "line 1"),
    ("dict.json", '{"prompt": "x"}', "JSON list of strings"),
    ("broken.json", "[1, ", "not valid JSON"),
])
def test_bad_prompt_files_are_one_line_errors(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DiffalignError, match=message) as err:
        read_prompts(tmp_path / name)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------ rewards


def test_reward_spec_grammar_name_path_weight(user_module):
    specs = parse_reward_specs("hpsv2.1@ckpt/HPS_v2.1_compressed.pt=5, pickscore=0.05,clip,edges_user_rewards:redness=-2")
    assert specs == [RewardSpec("hpsv2.1", "ckpt/HPS_v2.1_compressed.pt", 5.0), RewardSpec("pickscore", None, 0.05),
                     RewardSpec("clip", None, None), RewardSpec("edges_user_rewards:redness", None, -2.0)]
    assert [str(s) for s in specs] == ["hpsv2.1@ckpt/HPS_v2.1_compressed.pt=5", "pickscore=0.05", "clip",
                                       "edges_user_rewards:redness=-2"]
    assert [s.display_name for s in specs] == ["hpsv2.1", "pickscore", "clip", "redness"]
    # a list of strings (train's eval_rewards) or of specs reads the same; str() round-trips
    assert parse_reward_specs(["hpsv2.1@ckpt/HPS_v2.1_compressed.pt=5,pickscore=0.05", "clip",
                               "edges_user_rewards:redness=-2"]) == specs
    assert parse_reward_specs([str(s) for s in specs]) == specs == parse_reward_specs(specs)
    assert parse_reward_specs("toy-reward@/tmp/a=b/weights.pt")[0].path == "/tmp/a=b/weights.pt"


@pytest.mark.parametrize("text, message", [
    ("hpsv9", "unknown reward 'hpsv9': choose one of .*pickscore.* or write module:function"),
    ("toy-reward,nope=2", "unknown reward 'nope'"),
    ("pickscore=abc", "reward weight 'abc' in 'pickscore=abc' is not a number"),
    ("pickscore@", "malformed"),
    ("@weights=1", "malformed"),
    ("", "no reward given"),
    (" , ", "no reward given"),
    ("pickscore,pickscore@other", "'pickscore' appears twice"),
    ("edges_user_rewards:missing", "cannot import reward 'edges_user_rewards:missing'.*module:function"),
    ("no_such_module_xyz:fn", "cannot import reward"),
    ("edges_user_rewards:not_a_function", "not callable"),
    ("edges_user_rewards:redness@w.pt", "takes no @PATH"),
])
def test_bad_reward_specs_are_one_line_errors(user_module, text, message):
    with pytest.raises(DiffalignError, match=message) as err:
        parse_reward_specs(text)
    assert "\n" not in str(err.value)


def test_load_rewards_builds_registry_callable_and_ready_made_rewards(user_module):
    def total(images, prompts):
        return images.sum(dim=(1, 2, 3))

    def short(images, prompts):
        return torch.zeros(1)

    register_reward("test-edges-bright", brightness, overwrite=True)
    try:
        rewards = edges.load_rewards(["test-edges-bright", "edges_user_rewards:redness", total])
        assert list(rewards) == ["test-edges-bright", "redness", "total"]
        images = torch.rand(2, 3, 8, 8)
        torch.testing.assert_close(rewards["test-edges-bright"].score(images, ["a", "b"]), brightness(images, None))
        torch.testing.assert_close(rewards["redness"].score(images, ["a", "b"]), images[:, 0].mean(dim=(1, 2)))
        torch.testing.assert_close(rewards["total"].score(images, ["a", "b"]), total(images, None))
        # a callable's wrong output is caught with a one-line error naming the fix
        with pytest.raises(DiffalignError, match="1 scores for 2 images: it must return one score per image"):
            edges.load_rewards([short])["short"].score(images, ["a", "b"])
        with pytest.raises(DiffalignError, match="'brightness' appears twice"):
            edges.load_rewards([brightness, brightness])
    finally:
        REWARDS.pop("test-edges-bright", None)


def test_load_rewards_passes_path_dtype_and_options_to_the_builder(monkeypatch):
    import diffalign.rewards

    calls = []
    monkeypatch.setattr(diffalign.rewards, "load_reward",
                        lambda name, **kw: calls.append((name, kw)) or types.SimpleNamespace(name=name))
    rewards = edges.load_rewards("pickscore@weights/ps,hpsv2.1=5", device="cpu", dtype="bf16",
                                 options={"hpsv2.1": {"scale": 100}})
    assert list(rewards) == ["pickscore", "hpsv2.1"]
    assert calls == [("pickscore", {"path": "weights/ps", "device": "cpu", "dtype": torch.bfloat16}),
                     ("hpsv2.1", {"path": None, "device": "cpu", "dtype": torch.bfloat16, "scale": 100})]
    # every spec is checked before the first reward loads
    calls.clear()
    with pytest.raises(DiffalignError, match="unknown reward 'nope'"):
        edges.load_rewards("pickscore,nope")
    assert calls == []


# ------------------------------------------------------------------------------------- models


def test_toy_models_ship_their_sampling_defaults(tmp_path):
    assert sampling_defaults("toy-sd") == sampling_defaults("toy-flow") == {"num_inference_steps": 20, "guidance_scale": 4.0}
    assert sampling_defaults("some-org/some-model") == {} and sampling_defaults(tmp_path) == {}
    assert sampling_defaults(object()) == {}  # a pipeline object: its own defaults
    (tmp_path / "diffalign.json").write_text('{"num_inference_steps": 8}')
    assert sampling_defaults(str(tmp_path)) == {"num_inference_steps": 8}
    # a video model built for one size says so: eval and label sample it there, not at Wan's 480 x 832 x 81
    assert sampling_defaults("toy-video") == {"num_inference_steps": 20, "guidance_scale": 4.0, "height": 32, "width": 32,
                                              "num_frames": 9}
    (tmp_path / "diffalign.json").write_text('{"steps": 8}')
    with pytest.raises(DiffalignError, match="unknown keys steps: it may hold num_inference_steps, guidance_scale"):
        sampling_defaults(tmp_path)
    (tmp_path / "diffalign.json").write_text("{")
    with pytest.raises(DiffalignError, match="not valid JSON"):
        sampling_defaults(tmp_path)


def test_load_pipeline_from_a_toy_name_and_its_errors(tmp_path):
    import diffalign.models

    assert diffalign.models.load_pipeline is edges.load_pipeline  # the one loader, re-exported
    pipe = edges.load_pipeline("toy-sd", torch.float32, device="cpu")
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.unet.dtype == torch.float32
    assert pipe.unet.device.type == "cpu"
    with pytest.raises(DiffalignError, match="has no model_index.json"):
        edges.load_pipeline(tmp_path)
    with pytest.raises(DiffalignError, match="neither an existing folder nor a hub id"):
        edges.load_pipeline("./no/such/folder")


# -------------------------------------------------------------------------------------- files


def test_atomic_writes_replace_whole_files_and_clean_up_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    edges.atomic_write_text(target, "old")
    assert edges.atomic_write_bytes(target, b"new") == target and target.read_bytes() == b"new"

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(edges.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        edges.atomic_write_text(target, "half")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


# ------------------------------------------------------------------ commands: bad input, one line


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "toy-sd", "--baseline", "toy-sd", "--reward", "nope"], "unknown reward 'nope'"),
    (["eval", "--model", "toy-sd", "--baseline", "toy-sd", "--reward", "toy-reward=x"], "is not a number"),
    (["eval", "--model", "toy-sd", "--baseline", "toy-sd", "--dtype", "float32"], "unknown dtype 'float32'"),
    (["eval", "--model", "toy-sd", "--baseline", "toy-sd", "--prompts", "missing.txt"], "'missing.txt' not found"),
    (["label", "--model", "toy-sd", "--prompts", "toy", "--reward", "nope"], "unknown reward 'nope'"),
    (["label", "--model", "toy-sd", "--prompts", "toy", "--reward", "toy-reward@"], "malformed"),
    (["label", "--model", "toy-sd", "--prompts", "toy", "--reward", "toy-reward", "--dtype", "half"], "unknown dtype"),
    (["label", "--model", "toy-sd", "--prompts", "missing.txt", "--reward", "toy-reward"], "not found"),
    (["reno", "--model", "toy-sd", "--prompt", "p", "--reward", "nope=1"], "unknown reward 'nope'"),
    (["reno", "--model", "toy-sd", "--prompt", "p", "--dtype", "float16"], "unknown dtype 'float16'"),
    (["reno", "--model", "toy-sd", "--prompts", "missing.txt"], "not found"),
    (["reno", "--model", "toy-sd", "--prompt", "p", "--reward-dtype", "float32"], "unknown dtype"),
])
def test_commands_reject_bad_input_on_one_line_before_loading(tmp_path, capsys, no_model_loads, monkeypatch, argv, message):
    from diffalign.cli import main

    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffalign: error: ") and err.count("\n") == 1
    assert re.search(message, err), err


def test_score_and_cache_reject_bad_input_on_one_line(tmp_path, capsys, no_model_loads):
    from PIL import Image

    from diffalign.cli import main

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text("")
    for argv, message in [
        (["score", "--reward", "pickscore@", "--prompt", "x", str(tmp_path / "a.png")], "malformed"),
        (["score", "--reward", "nope", "--prompt", "x", str(tmp_path / "a.png")], "unknown reward 'nope'"),
        (["score", "--reward", "pickscore", "--dtype", "float32", "--prompt", "x", str(tmp_path / "a.png")],
         "unknown dtype"),
        (["cache", "--model", "toy-sd", "--dataset", str(tmp_path / "d.jsonl"), "--output-dir", str(tmp_path),
          "--dtype", "bfloat16"], "unknown dtype 'bfloat16'"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message.split("'")[0] in err and err.count("\n") == 1, err
