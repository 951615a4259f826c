"""Rewards inside diffusers pipelines: x0 prediction per scheduler family, the trajectory
callback, scoring pipeline output and best-of-N, on a tiny Stable Diffusion pipeline."""

from __future__ import annotations

import pytest
import torch

from diffalign.errors import DiffalignError
from diffalign.pipelines import RewardTrajectoryCallback, best_of_n, generate_and_score, predicted_x0


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def tiny_sd():
    """The tiny SD pipeline (diffalign.testing), with a DDIM scheduler whose last step lands on x0."""
    from diffusers import DDIMScheduler

    from diffalign.testing import tiny_pipeline

    pipe = tiny_pipeline("sd")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


SD_KWARGS = dict(height=32, width=32, num_inference_steps=3, guidance_scale=2.0)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("family, options", [("DDIMScheduler", {"clip_sample": False}), ("DDIMScheduler", {}),
                                             ("DDPMScheduler", {"clip_sample": False}), ("EulerDiscreteScheduler", {})])
def test_x0_equals_the_schedulers_own_prediction(family, options, prediction):
    """Our formula against the scheduler's own pred_original_sample (DDIM/DDPM clip by default)."""
    import diffusers

    scheduler = getattr(diffusers, family)(prediction_type=prediction, **options)
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    output, sample = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for t in scheduler.timesteps[:3]:  # advance stateful schedulers (Euler's step_index) to step 3
        scheduler.step(torch.zeros_like(output), t, sample)
    t = scheduler.timesteps[3]
    ours = predicted_x0(scheduler, output, t, sample)
    theirs = scheduler.step(output, t, sample, generator=g).pred_original_sample
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_flow_matching_x0_recovers_the_clean_sample():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(8)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for index in (0, 5):
        scheduler._step_index = index
        sigma = scheduler.sigmas[index]
        xt = (1 - sigma) * x0 + sigma * noise  # rectified-flow interpolation
        torch.testing.assert_close(predicted_x0(scheduler, noise - x0, scheduler.timesteps[index], xt), x0, atol=1e-5, rtol=1e-5)


def test_unsupported_scheduler_is_named():
    from diffusers import EDMEulerScheduler

    with pytest.raises(DiffalignError, match="EDMEulerScheduler is not supported"):
        predicted_x0(EDMEulerScheduler(), torch.zeros(1), 1.0, torch.zeros(1))


def test_trajectory_callback_ends_on_the_final_image(tiny_sd):
    tracker = RewardTrajectoryCallback(brightness, "a cat", keep_images=True)
    with tracker.attached(tiny_sd):
        out = tiny_sd("a cat", num_images_per_prompt=2, generator=torch.Generator().manual_seed(0),
                      callback_on_step_end=tracker, output_type="pt", **SD_KWARGS)
    assert "step" not in vars(tiny_sd.scheduler)  # the wrapper is gone again
    assert tracker.scores.shape == (3, 2) and tracker.steps == [0, 1, 2]
    # DDIM with set_alpha_to_one: the last step returns its own x0 prediction, so the last
    # recorded reward is the reward of the image the pipeline outputs.
    torch.testing.assert_close(tracker.images[-1], out.images, atol=1e-5, rtol=0)
    torch.testing.assert_close(tracker.scores[-1], brightness(out.images, None), atol=1e-5, rtol=0)
    assert not torch.allclose(tracker.scores[0], tracker.scores[-1])


def test_callback_must_be_attached(tiny_sd):
    tracker = RewardTrajectoryCallback(brightness, "a cat")
    with pytest.raises(DiffalignError, match="not attached"):
        tiny_sd("a cat", callback_on_step_end=tracker, output_type="pt", **SD_KWARGS)


def test_best_of_n_is_reproducible(tiny_sd):
    best = best_of_n(tiny_sd, "a cat", brightness, n=3, seed=10, batch_size=2, keep_all=True, **SD_KWARGS)
    assert best.scores.shape == (3,) and best.index == int(best.scores.argmax()) and best.seed == 10 + best.index
    torch.testing.assert_close(best.image, best.images[best.index])
    again, scores = generate_and_score(tiny_sd, "a cat", brightness, generator=torch.Generator().manual_seed(best.seed), **SD_KWARGS)
    torch.testing.assert_close(again[0], best.image, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores[0], best.scores[best.index], atol=1e-5, rtol=0)
    lean = best_of_n(tiny_sd, "a cat", brightness, n=3, seed=10, **SD_KWARGS)
    assert lean.images is None and lean.index == best.index
    torch.testing.assert_close(lean.image, best.image, atol=1e-5, rtol=0)
