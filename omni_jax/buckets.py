"""Static shapes: the padded sizes that bound how many programs XLA compiles.

Every compiled step sees only a few distinct shapes: a length is padded up to the next rung of a
ladder (`ladder`) or to a power of two (`bucket`). Prompt buckets, attention key lengths, talker
prompts and Code2Wav frame counts all come from these two functions. The vision encoder's frame grid uses
`fine_bucket` (several rungs per octave): its cost grows with the square of a frame's padded length.
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


def fine_bucket(n: int, steps: int = 4, multiple: int = 1) -> int:
    """The smallest rung >= n of a ladder with `steps` rungs per octave (2^k * (1 + j / steps)), rounded up to a
    multiple of `multiple`: at most 1 / steps of padding, `steps` compiled shapes per doubling."""
    if n <= 1:
        return max(1, multiple)
    base = 1 << (int(n - 1).bit_length() - 1)  # the octave [base, 2 base) holding n - 1
    rung = next(base * (steps + j) // steps for j in range(steps + 1) if base * (steps + j) // steps >= n)
    return -(-rung // multiple) * multiple
