"""The toy generators' training batches (tools/toy/generators.py)."""

from itertools import islice

import torch

from tools.toy import generators
from tools.toy.render import split_prompts


def batches(spec, count=3):
    torch.manual_seed(0)  # the VAE's random weights: the same for every call
    vae = generators.build_vae(shift_factor=0.0).eval()
    return list(islice(generators.generator_batches(spec, vae, torch.device("cpu"), shift=0.0), count))


def test_batches_are_seeded_training_prompts_with_the_guidance_dropout():
    spec = generators.GeneratorSpec(batch_size=64, renders_per_scene=1)
    first, again = batches(spec), batches(spec)
    train = {scene.prompt for scene in split_prompts()[0]}
    empty = total = 0
    for (x, prompts), (x_again, prompts_again) in zip(first, again):
        torch.testing.assert_close(x_again, x, rtol=0, atol=0)  # the same latents and noise every time
        assert prompts_again == prompts
        assert x.shape == (64, generators.LATENT_CHANNELS, generators.LATENT_SIZE, generators.LATENT_SIZE)
        assert all(p == "" or p in train for p in prompts)  # never a held-out prompt
        empty += prompts.count("")
        total += len(prompts)
    assert 0 < empty / total < 3 * generators.CFG_DROPOUT  # some prompts dropped, for guidance
