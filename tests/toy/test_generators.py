"""The toy generators' training batches (diffalign/toy/generators.py)."""

import random
from dataclasses import replace
from itertools import islice

import torch

from diffalign.toy import generators
from diffalign.toy.render import all_scenes, paraphrase


def batches(spec, count=3):
    torch.manual_seed(0)  # the VAE's random weights: the same for both specs
    vae = generators.build_vae(shift_factor=0.0).eval()
    return list(islice(generators.generator_batches(spec, vae, torch.device("cpu"), shift=0.0), count))


def test_reworded_batches_keep_the_recipe_and_only_reorder_words():
    spec = generators.GeneratorSpec(batch_size=64, renders_per_scene=1)
    plain, reworded = batches(spec), batches(replace(spec, reworded=0.5))
    scenes = {scene.prompt: scene for scene in all_scenes()}
    rng = random.Random(0)

    def word_orders(prompt):  # every rewording paraphrase makes of the prompt's scene
        return {paraphrase(scenes[prompt], rng, rewrites=r) for r in (1, 2, 3) for _ in range(30)}

    changed = kept = 0
    for (x_plain, p_plain), (x_reworded, p_reworded) in zip(plain, reworded):
        # rewording draws from its own stream: the latents and the canonical prompts are the recipe's
        torch.testing.assert_close(x_reworded, x_plain, rtol=0, atol=0)
        for before, after in zip(p_plain, p_reworded):
            if before == "":
                assert after == ""  # the guidance dropout is never reworded
            elif after != before:
                assert after in word_orders(before)  # the same scene, in another word order
                changed += 1
            else:
                kept += 1
    assert 0.35 < changed / (changed + kept) < 0.65  # about half of the non-empty prompts
    assert batches(replace(spec, reworded=0.5), count=1)[0][1] == reworded[0][1]  # the rewording is seeded


def test_the_rewording_stage_continues_the_saved_toy_flow_and_keeps_its_tokenizer(tmp_path):
    import shutil

    import pytest

    from diffalign.paths import asset
    from diffalign.toy.preference_data import load_toy_pipeline

    if not (asset("toy-flow") / "model_index.json").is_file():
        pytest.skip("toy assets not built")
    model = tmp_path / "toy-flow"
    shutil.copytree(asset("toy-flow"), model)
    cpu = torch.device("cpu")
    before = {k: v.clone() for k, v in load_toy_pipeline(model, cpu).transformer.state_dict().items()}
    spec = generators.GeneratorSpec(batch_size=4, renders_per_scene=1, flow_reword_steps=2)
    metrics = generators.reword_toy_flow(model, tmp_path / "work", spec, cpu, log=lambda *_: None)
    assert metrics["reword_steps"] == 2 and metrics["reword_final_loss"] > 0
    pipe = load_toy_pipeline(model, cpu)
    after = pipe.transformer.state_dict()
    assert after.keys() == before.keys() and any(not torch.equal(after[k], before[k]) for k in before)
    for folder in ("tokenizer", "tokenizer_2"):  # the toy vocabulary, not CLIP's full one
        for f in (asset("toy-flow") / folder).iterdir():
            assert (model / folder / f.name).read_bytes() == f.read_bytes()
    image = pipe(["two small red circles on the left on a gray background"], num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.isfinite(image).all()
