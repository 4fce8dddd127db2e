"""Continuous batching (omni_jax.runtime.scheduler): a request's output does not depend on what else runs.

Tiny config, random fp32 weights. One engine of 4 slots serves 8 requests (so some wait and reuse freed slots):
each request's tokens, codec frames and waveform are bit-identical to its solo run, with greedy and seeded
sampled requests, text-only and speech mixed. A greedy speech request equals the offline streaming path
(`OmniPipeline.stream`). Cancelling frees the slot at the next step; stopping cancels what is left.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from omni_jax.errors import UsageError
from omni_jax.runtime.sampling import TalkerSampling
from omni_jax.runtime.scheduler import EngineStopped, ServeRequest, ServingEngine
from omni_jax.runtime.types import Request

SLOTS = 4
TALKER_MAX = 24
PROMPTS = ["Tell me about the sea.", "hi", "What is JAX?", "你好,世界", "Count to ten.", "A poem, please.",
           "Why is the sky blue?", "ok"]


@pytest.fixture(scope="module")
def engine(tiny_pipe):
    eng = ServingEngine(tiny_pipe, slots=SLOTS, talker_max_new_tokens=TALKER_MAX,
                        talker_sampling=TalkerSampling.greedy())
    yield eng
    eng.stop(grace_s=0)


def _requests(pipe):
    out = []
    for i, p in enumerate(PROMPTS):
        # every third request samples with its own seed and temperature (top-k / top-p rows make every step sort
        # the vocabulary, which XLA:CPU at the tests' optimisation level 0 takes 0.25 s for: test_sampling covers them)
        sampled = i % 3 == 1
        out.append(ServeRequest(pipe.encode(Request(prompt=p)), max_new_tokens=6 + i, speech=i % 4 != 3,
                                speaker=("ethan", "chelsie", "aiden")[i % 3], temperature=0.6 + 0.2 * i if sampled else 0.0,
                                seed=100 + i))
    return out


def _same(a, b):
    assert a.token_ids == b.token_ids and a.text == b.text and a.finish_reason == b.finish_reason
    if a.codes is None:
        assert b.codes is None and a.wav is None and b.wav is None
        return
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.wav, b.wav)


def test_concurrent_requests_equal_their_solo_runs(engine, tiny_pipe):
    engine.start()
    reqs = _requests(tiny_pipe)
    solo = [engine.submit(r).result() for r in reqs]
    handles = []
    for r in reqs:  # staggered arrivals: every request joins a batch that is already running
        handles.append(engine.submit(r))
        time.sleep(0.03)
    together = [h.result() for h in handles]
    for a, b in zip(solo, together):
        _same(a, b)
    speech = [r for r in solo if r.codes is not None]
    assert all(r.codes.shape[1] > 0 and r.wav.size for r in speech)
    assert len({tuple(r.token_ids) for r in solo}) > 1
    snap = engine.snapshot()
    assert snap["active_slots"] == 0 and snap["requests_completed"] >= 2 * len(reqs)
    # the batch really was shared: more requests were in flight than slots, and steps < the solo runs' sum
    print(f"{len(reqs)} requests, {SLOTS} slots: {engine.steps} steps in all; "
          f"ttft p50 {snap['time_to_first_token_p50']:.3f} s, ttfa p50 {snap['time_to_first_audio_p50']:.3f} s")


def test_greedy_speech_equals_offline_stream(engine, tiny_pipe):
    engine.start()
    ids = tiny_pipe.encode(Request(prompt=PROMPTS[0]))
    served = engine.submit(ServeRequest(ids, max_new_tokens=10, speech=True)).result()
    stream = tiny_pipe.stream(ids, max_new_tokens=10, talker_max_new_tokens=TALKER_MAX,
                              talker_sampling=TalkerSampling.greedy())
    list(stream)
    off = stream.result
    assert served.token_ids == off.token_ids
    np.testing.assert_array_equal(served.codes, off.codes)
    assert served.wav.shape == off.wav.shape
    np.testing.assert_allclose(served.wav, off.wav, atol=1e-5)
    stages = ("time_to_first_token_s", "talker_prefill_s", "time_to_first_frame_s", "time_to_first_audio_s",
              "total_s")
    marks = [served.timings[k] for k in stages]
    assert marks == sorted(marks)


def test_cancel_frees_the_slot_at_the_next_step(tiny_pipe):
    eng = ServingEngine(tiny_pipe, slots=SLOTS, talker_max_new_tokens=TALKER_MAX,
                        talker_sampling=TalkerSampling.greedy())  # not started: the test drives the steps
    ids = tiny_pipe.encode(Request(prompt=PROMPTS[0]))
    h = eng.submit(ServeRequest(ids, max_new_tokens=40, speech=True))
    waiting = eng.submit(ServeRequest(ids, max_new_tokens=40))
    waiting.cancel()  # cancelled while still queued
    eng.step()
    assert eng.snapshot()["active_slots"] == 1
    h.cancel()
    eng.step()
    snap = eng.snapshot()
    assert snap["active_slots"] == 0 and snap["queue_length"] == 0 and snap["requests_cancelled"] == 2
    kinds = [ev.kind for ev in h]  # its events end with an error event, nothing after
    assert kinds[0] == "text" and kinds[-1] == "error"
    assert [ev.kind for ev in waiting] == ["error"]
    # the slot is reused, and the next request's result is unaffected by the cancelled one
    r = eng.submit(ServeRequest(ids, max_new_tokens=6))
    while eng.busy:
        eng.step()
    assert len(r.result().token_ids) >= 1


def test_bad_requests_fail_before_queueing(engine, tiny_pipe):
    ids = tiny_pipe.encode(Request(prompt="hi"))
    cases = [
        (ServeRequest(ids, max_new_tokens=tiny_pipe.max_len), "max_len"),
        (ServeRequest(ids, max_new_tokens=0), "max_new_tokens"),
        (ServeRequest([], max_new_tokens=4), "empty"),
        (ServeRequest(ids, max_new_tokens=4, speech=True, speaker="nobody"), "nobody"),
        (ServeRequest(ids, max_new_tokens=4, top_p=0.0), "top_p"),
    ]
    for req, word in cases:
        with pytest.raises(UsageError, match=word):
            engine.submit(req)
    with pytest.raises(UsageError, match="slots"):
        ServingEngine(tiny_pipe, slots=0)


def test_stop_cancels_what_is_left(tiny_pipe):
    eng = ServingEngine(tiny_pipe, slots=SLOTS, talker_max_new_tokens=TALKER_MAX,
                        talker_sampling=TalkerSampling.greedy()).start()
    ids = tiny_pipe.encode(Request(prompt=PROMPTS[0]))
    h = eng.submit(ServeRequest(ids, max_new_tokens=100, speech=True))
    next(iter(h))  # running
    eng.stop(grace_s=0.0)
    with pytest.raises(EngineStopped):
        h.result()
    with pytest.raises(EngineStopped):
        eng.submit(ServeRequest(ids, max_new_tokens=4))
