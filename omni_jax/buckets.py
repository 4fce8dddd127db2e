"""Static shapes: the padded sizes that bound how many programs XLA compiles.

Every compiled step sees only a few distinct shapes: a length is padded up to the next rung of a
ladder (`ladder`) or to a power of two (`bucket`). Prompt buckets, attention key lengths, talker
prompts and Code2Wav frame counts all come from these two functions.
"""

from __future__ import annotations


def ladder(limit: int, smallest: int, growth: int = 2) -> tuple[int, ...]:
    """smallest, growth*smallest, ... while below `limit`, then `limit` itself (the top rung)."""
    if smallest < 1 or growth < 2:
        raise ValueError(f"ladder needs smallest >= 1 and growth >= 2, got {smallest}, {growth}")
    out, n = [], smallest
    while n < limit:
        out.append(n)
        n *= growth
    return tuple(out) + (limit,)


def bucket(n: int, smallest: int = 16, cap: int | None = None) -> int:
    """The smallest power of two >= n (at least `smallest`), capped at `cap` when given."""
    b = max(smallest, 1 << max(0, int(n - 1).bit_length()))
    return b if cap is None else min(cap, b)
