"""NaN/Inf guard: a params tree poisoned in one component raises NumericalError naming that stage.

One OmniPipeline over the tiny random-weight model; each case swaps one poisoned leaf in (and back out),
so every stage runs its usual compiled functions. The poisoned leaf sits *after* everything the next stage
reads (output heads, the vocoder's last conv), so exactly one stage goes non-finite and the guard must name
that one, not a later stage that merely inherits garbage.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from omni_jax.errors import NumericalError
from omni_jax.runtime.sampling import SamplingParams
from omni_jax.cli.output import stream_to_outputs
from omni_jax.runtime.sampling import TalkerSampling

# stage -> (path of the poisoned leaf, poison value)
POISON = {
    "thinker": (("thinker", "lm_head"), np.nan),
    "talker": (("talker", "codec_head", "kernel"), np.nan),
    "code predictor": (("talker", "code_predictor", "lm_head_0"), np.nan),  # split heads: the CPU layout
    "code2wav": (("code2wav", "decoder_out", "kernel"), np.inf),
}
GEN = dict(max_new_tokens=4, talker_max_new_tokens=4, sampling=SamplingParams.greedy(),
           talker_sampling=TalkerSampling.greedy())


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    return tiny_pipe


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


class _Poisoned:
    """Context: the pipeline's leaf at `path` multiplied by `value` (NaN/Inf everywhere), restored after."""

    def __init__(self, pipe, path, value):
        self.pipe, self.path, self.value = pipe, path, value

    def __enter__(self):
        self.orig = _get(self.pipe.params, self.path)
        _set(self.pipe.params, self.path, self.orig * self.value)
        self.pipe.engine.params = self.pipe.params["thinker"]  # the engine holds the thinker tree itself
        return self.pipe

    def __exit__(self, *exc):
        _set(self.pipe.params, self.path, self.orig)
        self.pipe.engine.params = self.pipe.params["thinker"]


def test_clean_run_passes(pipe):
    (res,) = pipe.generate(["hi"], **GEN)
    assert res.wav is not None and len(res.wav) > 0 and np.isfinite(res.wav).all()


@pytest.mark.parametrize("stage", list(POISON))
def test_poisoned_stage_is_named(pipe, stage):
    path, value = POISON[stage]
    with _Poisoned(pipe, path, value):
        with pytest.raises(NumericalError) as info:
            pipe.generate(["hi"], **GEN)
    assert info.value.stage == stage
    assert f"in the {stage} output" in str(info.value)
    (res,) = pipe.generate(["hi"], **GEN)  # the engine (its cached KV buffers) stays usable afterwards
    assert np.isfinite(res.wav).all()


def test_streaming_guard_leaves_no_file(pipe, tmp_path):
    """--stream path: the first audio chunk of a poisoned vocoder raises before the WAV is opened."""
    out = tmp_path / "s.wav"
    path, value = POISON["code2wav"]
    with _Poisoned(pipe, path, value):
        stream = pipe.stream("hi", max_new_tokens=6, talker_max_new_tokens=6, sampling=SamplingParams.greedy(),
                             talker_sampling=TalkerSampling.greedy())
        with pytest.raises(NumericalError) as info, open(os.devnull, "w") as devnull:
            stream_to_outputs(stream, str(out), pipe.sample_rate, text_out=devnull)
    assert info.value.stage == "code2wav" and not out.exists()
