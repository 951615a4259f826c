"""Rollouts and pair selection on the tiny SD pipeline (diffalign/online.py)."""

from __future__ import annotations

import pytest
import torch

from diffalign import online
from diffalign.sampler import DDIMStep


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3)) * 100


def rewards():
    from diffalign.rewards import FunctionReward

    return {"bright": (FunctionReward(brightness, "bright"), 1.0)}


def test_select_pairs_keeps_only_a_softmax_gap_above_the_threshold():
    scores = torch.tensor([[0.0, 0.1, 0.2],   # softmax(0.2, 0) = (0.55, 0.45): gap 0.10 -> dropped
                           [0.0, 5.0, 1.0],   # gap 0.987 -> kept, best 1, worst 0
                           [2.0, 2.0, 2.0]])  # a tie: gap 0 -> dropped
    best, worst, valid = online.select_pairs(scores, 0.3)
    assert valid.tolist() == [False, True, False]
    assert (best[1].item(), worst[1].item()) == (1, 0)
    assert online.select_pairs(scores, 0.05)[2].tolist() == [True, True, False]


def rollout(pipe, slots, k=2, threshold=0.0, steps=6, divert=2, reward=None):
    setup = online.rollout_setup(pipe, "a", steps=steps, guidance_scale=4.0, resolution=32, transition=DDIMStep(1.0))
    prompts = ["a red circle", "two blue squares"]
    return online.branch_rollout(online.condition(setup, prompts), prompts, [0, 1], slots, reward or rewards(),
                                 online.slot_generators(0, slots), num_candidates=k, divert_start_step=divert,
                                 threshold=threshold)


def test_the_continuing_candidate_is_one_of_the_k(tiny_sd):
    """With k = 2 the candidates of a step are its pair: the next step's x_t is one of them,
    sometimes the winner, sometimes the loser (chosen at random, not by the reward)."""
    result = rollout(tiny_sd, [0, 1], k=2)
    pairs = result.pairs
    assert result.candidate_steps == 2 * 4  # 2 prompts, steps 2..5 branch
    assert len(pairs) == 8 and sorted(set(pairs.step.tolist())) == [2, 3, 4, 5]
    took = []
    for slot in (0, 1):
        mine = pairs.index((pairs.slot == slot).nonzero()[:, 0])
        for i in range(len(mine) - 1):
            nxt = mine.x[i + 1]
            is_win, is_lose = torch.equal(nxt, mine.win[i]), torch.equal(nxt, mine.lose[i])
            assert is_win != is_lose
            took.append(is_win)
    assert any(took) and not all(took)


def test_rollouts_are_deterministic_per_slot(tiny_sd):
    a, b = rollout(tiny_sd, [0, 1]), rollout(tiny_sd, [0, 1])
    for field in online.Pairs.FIELDS:
        assert torch.equal(getattr(a.pairs, field), getattr(b.pairs, field)), field
    # a slot's draws are its own: slot 1 alone in another rollout position differs, and the
    # same slot sampled beside another prompt gives the same pairs
    c = rollout(tiny_sd, [0, 7])
    first = lambda r: r.pairs.index((r.pairs.prompt == 0).nonzero()[:, 0])  # noqa: E731
    assert torch.equal(first(a).win, first(c).win)
    second = lambda r: r.pairs.index((r.pairs.prompt == 1).nonzero()[:, 0])  # noqa: E731
    assert not torch.equal(second(a).win, second(c).win)


def test_below_threshold_pairs_are_dropped(tiny_sd):
    loose = rollout(tiny_sd, [0, 1], k=3, threshold=0.0)
    strict = rollout(tiny_sd, [0, 1], k=3, threshold=0.99)
    assert len(loose.pairs) == loose.candidate_steps
    assert len(strict.pairs) == 0 and strict.candidate_steps == loose.candidate_steps
    # the kept pairs are the best and the worst of their candidates: the winner scores higher
    from diffalign.sampler import decode

    setup = online.rollout_setup(tiny_sd, "a", steps=6, guidance_scale=4.0, resolution=32, transition=DDIMStep(1.0))
    last = loose.pairs.index((loose.pairs.step == 5).nonzero()[:, 0])  # last step: clean latents, scored as they are
    with torch.no_grad():
        win, lose = brightness(decode(setup, last.win), None), brightness(decode(setup, last.lose), None)
    assert (win > lose).all()


def test_timestep_reaches_a_step_aware_reward(tiny_sd):
    seen = []

    class StepAware(torch.nn.Module):
        name = "stepaware"

        def score(self, images, prompts, *, t=0, exact=False):
            seen.append(torch.as_tensor(t).clone())
            return images.mean(dim=(1, 2, 3))

    rollout(tiny_sd, [0, 1], k=2, reward={"s": (StepAware(), 1.0)})
    setup = online.rollout_setup(tiny_sd, "a", steps=6, guidance_scale=4.0, resolution=32, transition=DDIMStep(1.0))
    # steps 3..5 score the predicted x0 at the candidate's timestep; after the last step, t = 0
    assert [int(t[0]) for t in seen] == [int(x) for x in setup.timesteps[3:]] + [0]
    assert all(len(t) == 4 for t in seen)  # 2 prompts x 2 candidates


def test_pool_orders_by_slot_and_step_before_the_shuffle():
    def pairs(slots, steps):
        n = len(slots)
        return online.Pairs(torch.tensor(steps), torch.zeros(n, dtype=torch.long), torch.tensor(slots),
                            torch.arange(n, dtype=torch.float)[:, None], torch.zeros(n, 1), torch.zeros(n, 1))

    # the same pairs in a process-major order (two processes) and a step-major one (one process)
    a = online.pool(pairs([0, 0, 1, 1], [2, 3, 2, 3]), None, torch.Generator().manual_seed(5))
    b = online.pool(pairs([0, 1, 0, 1], [2, 2, 3, 3]), None, torch.Generator().manual_seed(5))
    assert a.slot.tolist() == b.slot.tolist() and a.step.tolist() == b.step.tolist()
    buffer = online.PairBuffer((1,))
    buffer.extend(a)
    head = buffer.take(3)
    assert len(head) == 3 and len(buffer) == 1
    restored = online.PairBuffer((1,))
    restored.load_state_dict(buffer.state_dict())
    assert torch.equal(restored.pairs.slot, buffer.pairs.slot)
