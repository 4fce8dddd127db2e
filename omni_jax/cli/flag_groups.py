"""Flag groups every launcher shares, so infer.py, batch.py (and the server) accept the same names with the
same defaults, and map them onto the runtime's settings the same way.

Importing this module defines nothing; each launcher calls the `define_*` groups it needs. The flag
values -> settings mappings import the runtime lazily, so bad flags still fail before jax loads.
"""

from __future__ import annotations

from typing import Any, Mapping

from absl import flags

from omni_jax.errors import UsageError
from omni_jax.runtime.types import DEFAULT_CHUNK_FRAMES, DEFAULT_FIRST_CHUNK_FRAMES, MAX_CHUNK_FRAMES, MIN_CHUNK_FRAMES

FLAGS = flags.FLAGS

#: Names and defaults of the sampling group (also the keys a batch line may override).
SAMPLING_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 64, "greedy": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0,
    "talker_max_new_tokens": 1024, "talker_greedy": False, "talker_temperature": 0.9, "talker_top_k": 50,
    "talker_top_p": 1.0, "talker_repetition_penalty": 1.05,
}


def define_model_flags() -> None:
    """Which weights, where they run: --checkpoint, --dtype, --max_len, --mesh, --prefill_chunk."""
    flags.DEFINE_string("checkpoint", None, "Checkpoint dir from launch/convert.py; default: the tiny model with "
                        "RANDOM weights (a smoke test, its text and audio are noise).")
    flags.DEFINE_string("dtype", None, "float32 | bfloat16 (default: float32 on CPU, bfloat16 on accelerators).")
    flags.DEFINE_integer("max_len", 1024, "KV-cache length: prompt + max_new_tokens must fit.", lower_bound=2)
    flags.DEFINE_string("mesh", None, "Shard over a device mesh, e.g. tp4ep8, ep8, dp2tp4, auto (default: one device).")
    flags.DEFINE_integer("prefill_chunk", None, "Prefill long prompts in chunks of this many tokens (bounds prefill "
                         "memory).")


def define_sampling_flags() -> None:
    """Text and speech budgets and sampling: the thinker's (HF logits processors) and the talker's (HF
    generate defaults), plus --seed and --speaker."""
    d = SAMPLING_DEFAULTS
    flags.DEFINE_integer("max_new_tokens", d["max_new_tokens"], "Maximum number of generated text tokens.",
                         lower_bound=1)
    flags.DEFINE_bool("greedy", d["greedy"], "Greedy text decoding (same as --temperature=0).")
    flags.DEFINE_float("temperature", d["temperature"], "Sampling temperature; 0 = greedy.")
    flags.DEFINE_integer("top_k", d["top_k"], "Top-k filter; 0 = off.")
    flags.DEFINE_float("top_p", d["top_p"], "Top-p (nucleus) filter; 1 = off.")
    flags.DEFINE_float("repetition_penalty", d["repetition_penalty"], "HF-style repetition penalty; 1 = off.")
    flags.DEFINE_integer("talker_max_new_tokens", d["talker_max_new_tokens"],
                         "Maximum talker tokens (codec frames of 80 ms, + 1).", lower_bound=1)
    flags.DEFINE_bool("talker_greedy", d["talker_greedy"],
                      "Greedy talker and code predictor (keeps the talker repetition penalty).")
    flags.DEFINE_float("talker_temperature", d["talker_temperature"],
                       "Talker sampling temperature (HF default 0.9); 0 = greedy.")
    flags.DEFINE_integer("talker_top_k", d["talker_top_k"], "Talker top-k (HF default 50); 0 = off.")
    flags.DEFINE_float("talker_top_p", d["talker_top_p"], "Talker top-p (HF default 1.0 = off).")
    flags.DEFINE_float("talker_repetition_penalty", d["talker_repetition_penalty"],
                       "Talker repetition penalty on codec group 0 (HF default 1.05).")
    flags.DEFINE_integer("seed", 0, "PRNG seed for sampling.")
    flags.DEFINE_string("speaker", "ethan", "Voice (case-insensitive), e.g. ethan, chelsie, aiden.")


def define_stream_flags() -> None:
    """--stream_chunk / --stream_first_chunk, range-checked by absl at parse time (a usage error before anything
    loads)."""
    bounds = dict(lower_bound=MIN_CHUNK_FRAMES, upper_bound=MAX_CHUNK_FRAMES)
    flags.DEFINE_integer("stream_chunk", DEFAULT_CHUNK_FRAMES,
                         f"Codec frames (80 ms each) per streamed audio chunk, {MIN_CHUNK_FRAMES}..{MAX_CHUNK_FRAMES}; "
                         "1 streams 80 ms packets.", **bounds)
    flags.DEFINE_integer("stream_first_chunk", DEFAULT_FIRST_CHUNK_FRAMES,
                         "Codec frames in a stream's first audio chunk (then --stream_chunk each): 1 gives the "
                         "earliest first audio.", **bounds)


def sampling_values(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The sampling group's flag values, with per-item overrides (a batch line) on top. An item that sets
    temperature, top_k or top_p without 'greedy' samples even when --greedy is on."""
    values = {k: FLAGS[k].value for k in SAMPLING_DEFAULTS}
    overrides = dict(overrides or {})
    if "greedy" not in overrides and {"temperature", "top_k", "top_p"} & set(overrides):
        overrides["greedy"] = False
    values.update(overrides)
    return values


def _flag_error(e: UsageError, prefix: str) -> UsageError:
    """Re-word a SamplingParams/TalkerSampling range error in terms of the flag that set the value."""
    if getattr(e, "field", None) is None:
        return e
    return UsageError(f"--{prefix}{e.field}={e.value!r}: {e.rule}")


def samplings(values: Mapping[str, Any] | None = None):
    """(SamplingParams, TalkerSampling) from `sampling_values()` (or the given values); every value is
    range-checked, even where greedy ignores it, and errors name the flag."""
    from omni_jax.runtime.sampling import SamplingParams, TalkerSampling

    v = sampling_values() if values is None else values
    try:
        text = SamplingParams(v["temperature"], v["top_k"], v["top_p"], v["repetition_penalty"])
    except UsageError as e:
        raise _flag_error(e, "") from None
    if v["greedy"] or v["temperature"] == 0.0:
        text = SamplingParams.greedy(repetition_penalty=v["repetition_penalty"])
    if v["talker_temperature"] < 0:
        raise UsageError(f"--talker_temperature={v['talker_temperature']!r}: must be >= 0 (0 = greedy)")
    greedy = v["talker_greedy"] or v["talker_temperature"] == 0.0
    try:
        talker = TalkerSampling(do_sample=not greedy, temperature=v["talker_temperature"] if not greedy else 0.9,
                                top_k=v["talker_top_k"], top_p=v["talker_top_p"],
                                repetition_penalty=v["talker_repetition_penalty"])
    except UsageError as e:
        raise _flag_error(e, "talker_") from None
    if greedy:
        talker = TalkerSampling.greedy(repetition_penalty=v["talker_repetition_penalty"])
    return text, talker


def parse_dtype_flag(name: str | None):
    """--dtype -> a jnp dtype (default per backend); a bad name is a usage error naming the flag."""
    from omni_jax.runtime.loading import parse_dtype

    try:
        return parse_dtype(name)
    except ValueError as e:
        raise UsageError(f"--dtype: {e}") from None


def make_mesh_flag(spec: str | None, config):
    """--mesh -> a Mesh fitted to the model (None without the flag); errors name the flag."""
    if not spec:
        return None
    from omni_jax.sharding import mesh as mesh_lib

    try:
        return mesh_lib.make_mesh(spec, config=config)
    except mesh_lib.MeshSpecError as e:
        raise UsageError(f"--mesh: {e}") from None
