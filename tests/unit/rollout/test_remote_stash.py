"""The rollouts in flight a checkpoint records (``rollout.remote``) read back exactly (JSON, no pickle): every
sample's tokens, log-probs (float64 round trip), top-k and finish reason, and the weights version that made them."""

from megatron_s2d.rollout.base import GenerationResult, Sample
from megatron_s2d.rollout.remote import _stash_from_json, _stash_to_json


def test_in_flight_rollouts_round_trip_and_keep_only_steps_to_come():
    s = Sample(prompt_ids=[1, 2], response_ids=[3, 4], logprobs=[-0.1234567891234567, -2.5e-08],
               finish_reason="length", topk_ids=[[3, 5], [4, 6]], topk_logprobs=[[-0.1, -2.0], [-1e-9, -3.0]])
    r = GenerationResult(samples=[[s, s]], metrics={"tokens_per_s": 12.5}, sync={})
    stash = {4: ({0: r, 1: r}, {"version": 3, "busy_s": 0.5, "idle_s": 0.1}),
             5: ({0: r, 1: r}, {"version": 4, "busy_s": 0.5, "idle_s": 0.0})}
    back = _stash_from_json(_stash_to_json(stash), start_step=5)
    assert list(back) == [5]
    got, meta = back[5]
    assert meta == stash[5][1] and got[1] == r and got[0].samples[0][1].logprobs == s.logprobs
