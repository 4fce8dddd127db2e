"""Property-based tests (hypothesis): tokenizer round trip, ChatML structure, mesh specs, top-k/top-p masks,
and the converter's HF-name -> param-slot mapping on the real checkpoint's 28,010 names.

The tokenizer normalises text with Unicode NFC (the HF Qwen2/Qwen3 tokenizer's normalizer, applied by the
Rust backend to the text between added tokens; added tokens such as <|im_end|> are matched on the raw
text), so the round trip is decode(encode(t)) == NFC(t), with NFC as the backend implements it.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from omni_jax import load_config
from omni_jax.checkpoint import convert
from omni_jax.models import registry
from omni_jax.sharding.mesh import MeshSpecError, mesh_spec_string, parse_mesh_spec
from omni_jax.runtime.sampling import top_k_filter, top_p_filter
from omni_jax.sharding.mesh import DATA, EXPERT, TENSOR
from omni_jax.processing.tokenizer import added_tokens, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# database=None: no .hypothesis/ dir in the checkout; failures print their reproducing example.
FAST = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
ADDED = [t["content"] for t in added_tokens()]

# Any Unicode scalar value except surrogates (not encodable as UTF-8, so not valid `str` input for the backend).
unicode_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)


@functools.lru_cache(maxsize=1)
def _tok():
    return load_tokenizer()


def _norm(s: str) -> str:
    return _tok().backend.normalizer.normalize_str(s)


def _no_added(s: str) -> bool:
    return not any(t in s for t in ADDED)


# ---------------------------------------------------------------------------- tokenizer

@FAST
@given(unicode_text)
def test_tokenizer_round_trip_is_nfc(text):
    assume(_no_added(text))
    tok = _tok()
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == _norm(text)
    assert tok.encode(_norm(text)) == ids  # normalisation happens first: NFC text encodes identically


@FAST
@given(st.lists(st.tuples(st.text(st.characters(exclude_categories=("Cs",), exclude_characters="<>|"), max_size=12),
                          st.sampled_from(ADDED)), max_size=4),
       st.text(st.characters(exclude_categories=("Cs",), exclude_characters="<>|"), max_size=12))
def test_tokenizer_added_tokens_are_atomic(pieces, tail):
    """Added tokens in the text become their single ids; the text between them is normalised on its own."""
    tok = _tok()
    text = "".join(a + t for a, t in pieces) + tail
    ids = tok.encode(text)
    specials = [i for i in ids if i >= 151643]
    assert specials == [tok.token_to_id(t) for _, t in pieces]
    assert tok.decode(ids) == "".join(_norm(a) + t for a, t in pieces) + _norm(tail)


messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(("system", "user", "assistant")),
                                           "content": unicode_text}), max_size=4)


@FAST
@given(messages, st.booleans())
def test_chat_template_structure(msgs, add_generation_prompt):
    """<|im_start|>{role}\\n{content}<|im_end|>\\n per message, then <|im_start|>assistant\\n; contents decode back."""
    assume(all(_no_added(m["content"]) for m in msgs))
    tok = _tok()
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    (nl,) = tok.encode("\n")
    ids = tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt)
    text = tok.apply_chat_template_text(msgs, add_generation_prompt=add_generation_prompt)
    assert tok.encode(text) == ids
    pos = 0
    for m in msgs:
        assert ids[pos] == start
        stop = ids.index(end, pos + 1)
        body = ids[pos + 1: stop]
        assert start not in body
        assert body == tok.encode(f"{m['role']}\n{m['content']}")
        assert tok.decode(body) == _norm(f"{m['role']}\n{m['content']}")
        assert ids[stop + 1] == nl
        pos = stop + 2
    if add_generation_prompt:
        assert ids[pos:] == [start] + tok.encode("assistant\n")
    else:
        assert pos == len(ids)
    assert ids.count(start) == len(msgs) + add_generation_prompt
    if ids:
        assert ids[0] == start and text.startswith("<|im_start|>")


# ---------------------------------------------------------------------------- mesh specs

_AXIS = {"dp": DATA, "ep": EXPERT, "tp": TENSOR}


@FAST
@given(st.integers(1, 16), st.integers(1, 16), st.integers(1, 16), st.permutations(["dp", "ep", "tp"]),
       st.lists(st.booleans(), min_size=3, max_size=3), st.booleans(), st.sampled_from(["", " ", "\t"]))
def test_mesh_spec_round_trip(dp, ep, tp, order, keep_ones, upper, pad):
    sizes = {DATA: dp, EXPERT: ep, TENSOR: tp}
    n = dp * ep * tp
    tokens = [p for p, keep in zip(order, keep_ones) if sizes[_AXIS[p]] > 1 or keep] or [order[0]]
    spec = "".join(f"{p}{sizes[_AXIS[p]]}" for p in tokens)
    spec = pad + (spec.upper() if upper else spec) + pad
    assert parse_mesh_spec(spec, n) == sizes
    formatted = mesh_spec_string(types.SimpleNamespace(shape=sizes))  # only .shape is read
    assert formatted == f"dp{dp}ep{ep}tp{tp}"
    assert parse_mesh_spec(formatted, n) == sizes
    with pytest.raises(MeshSpecError, match=f"needs {n} devices"):
        parse_mesh_spec(spec, n + 1)


def _reference_parse(spec: str, n: int) -> dict | None:
    """The grammar: 'auto', or one or more distinct dp<N>/ep<N>/tp<N> (N >= 1, ASCII digits) whose product is n."""
    s = spec.strip().lower()
    if s == "auto":
        return "auto"
    if not re.fullmatch(r"(?:(?:dp|ep|tp)[0-9]+)+", s):
        return None
    toks = re.findall(r"(dp|ep|tp)([0-9]+)", s)
    if len({p for p, _ in toks}) != len(toks) or any(int(v) < 1 for _, v in toks):
        return None
    sizes = {DATA: 1, EXPERT: 1, TENSOR: 1}
    sizes.update({_AXIS[p]: int(v) for p, v in toks})
    return sizes if math.prod(sizes.values()) == n else None


@FAST
@given(st.one_of(st.text("dpte0123456789 x,:-\u0663\uff14", max_size=12),
                 st.lists(st.tuples(st.sampled_from(["dp", "ep", "tp", "pd", "d", "tpp", ""]),
                                    st.sampled_from(["0", "1", "2", "4", "8", "01", "", "x"])), max_size=4)
                 .map(lambda ts: "".join(a + b for a, b in ts))),
       st.integers(1, 64))
def test_mesh_spec_invalid_raises_mesh_spec_error(spec, n):
    want = _reference_parse(spec, n)
    if want is None:
        with pytest.raises(MeshSpecError):
            parse_mesh_spec(spec, n)
    elif want != "auto":
        assert parse_mesh_spec(spec, n) == want


@FAST
@given(st.integers(1, 64), st.one_of(st.none(), st.integers(1, 256)))
def test_mesh_spec_auto(n, experts):
    sizes = parse_mesh_spec("auto", n, experts)
    assert sizes[DATA] * sizes[EXPERT] * sizes[TENSOR] == n and sizes[DATA] == 1
    assert sizes[EXPERT] == (n if not experts else math.gcd(n, experts))


# ---------------------------------------------------------------------------- top-k / top-p

_SHAPES = [(1, 5), (2, 16), (3, 64)]
logits_arrays = st.sampled_from(_SHAPES).flatmap(
    lambda shape: hnp.arrays(np.float32, shape, elements=st.floats(-30, 30, width=32, allow_subnormal=False)))
# (no subnormals: XLA on CPU flushes them to zero, so -1e-45 and 0 compare equal there and not in numpy)
_top_p = jax.jit(top_p_filter)  # p traced: one compile per shape


def _softmax64(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@FAST
@given(logits_arrays, st.data())
def test_top_k_keeps_exactly_the_k_largest(logits, data):
    k = data.draw(st.integers(1, logits.shape[-1]), label="k")
    out = np.asarray(top_k_filter(jnp.asarray(logits), k))
    kept = np.isfinite(out)
    kth = -np.sort(-logits, axis=-1)[:, k - 1:k]
    np.testing.assert_array_equal(kept, logits >= kth)  # ties with the k-th value are kept, as in HF
    np.testing.assert_array_equal(out[kept], logits[kept])
    for row, kr, t in zip(logits, kept, kth[:, 0]):
        assert kr.sum() == k + np.sum(row == t) - np.sum(-np.sort(-row)[:k] == t)  # exactly k unless tied at the edge


@FAST
@given(logits_arrays, st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_prefix_reaching_p(logits, p):
    """Kept = the most likely tokens, as few as possible whose mass reaches p (HF: drop tokens whose ascending
    cumulative mass is <= 1 - p). Float32 vs the float64 reference: the count may sit anywhere between the
    answers for p -/+ 1e-5. Tied logits have equal probabilities, so the count does not depend on tie order."""
    tol = 1e-5
    out = np.asarray(_top_p(jnp.asarray(logits), p))
    kept = np.isfinite(out)
    np.testing.assert_array_equal(out[kept], logits[kept])
    probs = _softmax64(logits)
    for row, pr, kr in zip(logits, probs, kept):
        n = int(kr.sum())
        assert n >= 1
        assert row[kr].min() >= (row[~kr].max() if (~kr).any() else -np.inf)  # a top set
        mass = np.cumsum(np.sort(pr)[::-1])  # mass of the top-1, top-2, ... tokens

        def smallest(q):  # fewest top tokens whose mass reaches q (all of them if none does)
            return min(int(np.searchsorted(mass, q, side="left")) + 1, len(row))

        assert smallest(p - tol) <= n <= smallest(p + tol), (n, p, mass)
        assert pr[kr].sum() >= p - tol


# ---------------------------------------------------------------------------- converter name mapping

@functools.lru_cache(maxsize=1)
def _manifest_mapping():
    """Every non-skipped real key -> (param path, stack index), and the inverse table."""
    config = load_config(os.path.join(ROOT, "configs", "qwen3_omni_30b_a3b_instruct.json"))
    rules = registry.hf_rules(config)
    with gzip.open(os.path.join(ROOT, "tools", "data", "qwen3_omni_weight_manifest.tsv.gz"), "rt") as f:
        keys = [line.split("\t", 1)[0] for line in f][1:]
    forward = {}
    for k in keys:
        if registry.owner(k).built:
            _, path, index = convert.match_key(k, rules)
            forward[k] = (path, index)
    inverse = {}
    for k, slot in forward.items():
        inverse.setdefault(slot, []).append(k)
    return rules, forward, inverse, keys


def test_name_mapping_is_a_bijection_onto_its_slots():
    _, forward, inverse, keys = _manifest_mapping()
    assert len(keys) == 28010 and len(forward) == 28010  # every tensor, the vision tower's included
    collisions = {slot: ks for slot, ks in inverse.items() if len(ks) > 1}
    assert not collisions, list(collisions.items())[:3]


@settings(max_examples=300, deadline=None, database=None)
@given(st.data())
def test_name_mapping_injective_and_invertible(data):
    rules, forward, inverse, _ = _manifest_mapping()
    names = sorted(forward)
    k1, k2 = data.draw(st.sampled_from(names), label="k1"), data.draw(st.sampled_from(names), label="k2")
    for k in (k1, k2):
        _, path, index = convert.match_key(k, rules)  # recomputed: matching is deterministic
        assert (path, index) == forward[k]
        assert inverse[(path, index)] == [k]  # the slot names its key back
        assert path[0] == registry.owner(k).name  # a component's keys land in that component's params
        if registry.owner(k).name == "thinker":  # thinker leaves are stacked exactly when the key is per decoder layer
            assert (re.search(r"\.layers\.\d+\.", k) is not None) == (len(index) > 0), (k, path, index)
    assert (forward[k1] == forward[k2]) == (k1 == k2)


@settings(max_examples=300, deadline=None, database=None)
@given(st.integers(1, 1 << 20), st.sampled_from([1, 2, 4]), st.sampled_from([1, 4, 16]))
def test_fine_bucket_pads_at_most_one_step_of_an_octave(n, steps, multiple):
    """The vision encoder's frame-grid sizes: never below n, a multiple as asked, at most n / steps (+ the rounding
    to the multiple) above it, and monotone, so a longer frame never gets a shorter grid."""
    from omni_jax.buckets import fine_bucket

    b = fine_bucket(n, steps, multiple)
    assert b >= n and b % multiple == 0
    assert b <= math.ceil(n * (1 + 1 / steps)) + multiple
    assert fine_bucket(n + 1, steps, multiple) >= b
