"""Continuous batching: one scheduler loop serving many requests over fixed decode slots.

`ServingEngine` owns `slots` rows in each stage (omni_jax.runtime.slots): the thinker's KV cache, the talker's
state and the streaming vocoder's state (`VocoderStream`, one row per slot). A request takes one free slot
for its whole life (text, then the rest of its speech) and gives it back the step it finishes or is
cancelled. Every device call happens on the engine's own thread; callers `submit` from any thread and get
events through a sink (a thread-safe queue by default).

The loop, one iteration ("step"):
  1. drop cancelled requests (their slot is free for this very step's admissions);
  2. admit waiting requests, first come first served, into free slots: the audio encoder, the thinker's
     batch-1 prefill (the offline engine's compiled prefill), `thinker_insert` (token 1 with the request's
     own settings) and, for speech, the talker's batch-1 prefill and `talker_insert`. Policy: at most
     `prefills_per_step` admissions while other requests are decoding, which bounds the stall a prefill
     puts on everyone else's next token; as many as there are free slots when nothing is decoding;
  3. one thinker step for every row still writing text (one compiled [slots] step);
  4. one talker + code-predictor step for every speech row whose next text column exists: column s needs
     reply token s+1, or the thinker's end (then tts_eos, then tts_pad). Thinker before talker, so while
     the text lasts each step gives every row one token and one frame;
  5. the vocoder over every speech row with a chunk ready (its first `first_chunk_frames` frames, then
     every `chunk_frames`, a short chunk when its talker is done): one call per chunk width in use;
  6. events out: text deltas, audio chunks, and the final `Result` of requests that finished.

A row's numbers never depend on the other rows (see omni_jax.runtime.slots), so a request's greedy or seeded
output is the same whatever else runs and whenever it arrived; the tests check it token for token, code for
code and sample for sample.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import queue
import secrets
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax import buckets
from omni_jax.errors import NumericalError, OmniError, UsageError
from omni_jax.models.talker import Talker
from omni_jax.runtime import slots as slots_lib
from omni_jax.runtime.sampling import SamplingParams, TalkerSampling
from omni_jax.runtime.streaming import TextDeltas, start_talker_row
from omni_jax.runtime.types import (DEFAULT_CHUNK_FRAMES, DEFAULT_FIRST_CHUNK_FRAMES, PromptRows, Result,
                                    check_chunk_frames)
from omni_jax.runtime.vocoder import VocoderStream
from omni_jax.sharding import jit as sjit

log = logging.getLogger(__name__)


class EngineStopped(OmniError):
    """The engine is shutting down (or has stopped) and takes no more requests."""


class Cancelled(OmniError):
    """The request was cancelled (its client went away)."""


class QueueFull(OmniError):
    """More requests are waiting than the engine queues."""


@dataclasses.dataclass
class ServeRequest:
    """One request for the engine: exact prompt ids (template applied) and its settings."""

    prompt_ids: list[int]
    max_new_tokens: int
    audio: list[np.ndarray] = dataclasses.field(default_factory=list)  # log-mel features per clip
    visual: list[Any] = dataclasses.field(default_factory=list)  # images / videos (processing.vision.VisualInput)
    speech: bool = False
    speaker: str = "ethan"
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed


@dataclasses.dataclass
class Event:
    """What a request's sink receives, in order: "text" (a delta and its token ids), "audio" (samples of
    `frames` new codec frames), then exactly one "done" (with the `Result`) or "error" (with the exception)."""

    kind: str
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    audio: np.ndarray | None = None
    frames: int = 0
    result: Result | None = None
    error: Exception | None = None
    t: float = 0.0  # seconds since submit


class Handle:
    """A submitted request: iterate it for its events (default sink), or `cancel()` it."""

    def __init__(self, rid: int, sink: Callable[[Event], None] | None):
        self.id = rid
        self._queue: queue.Queue | None = queue.Queue() if sink is None else None
        self._sink = sink if sink is not None else self._queue.put
        self.cancelled = False
        self.finished = False

    def cancel(self) -> None:
        """Free the request's slot at the next step (a client that went away)."""
        self.cancelled = True

    def _emit(self, event: Event) -> None:
        if event.kind in ("done", "error"):
            self.finished = True
        self._sink(event)

    def __iter__(self) -> Iterator[Event]:
        if self._queue is None:
            raise TypeError("this handle delivers its events to the sink it was submitted with")
        while True:
            ev = self._queue.get()
            yield ev
            if ev.kind in ("done", "error"):
                return

    def result(self) -> Result:
        """Wait for the end; the `Result`, or the request's error raised."""
        for ev in self:
            if ev.kind == "error":
                raise ev.error
            if ev.kind == "done":
                return ev.result
        raise RuntimeError("unreachable")


@dataclasses.dataclass
class _Row:
    handle: Handle
    req: ServeRequest
    t_submit: float
    slot: int = -1
    tokens: list[int] = dataclasses.field(default_factory=list)
    detok: TextDeltas | None = None
    thinker_done: bool = False
    speaking: bool = False  # has a talker row
    talker_done: bool = True
    frames: list[np.ndarray] = dataclasses.field(default_factory=list)  # [Q] codes per frame
    decoded: int = 0  # frames sent through the vocoder
    wav: list[np.ndarray] = dataclasses.field(default_factory=list)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    mm_rows: Any = None
    prompt_logits: Any = None

    def now(self) -> float:
        return time.perf_counter() - self.t_submit


class Metrics:
    """Counters and recent latencies for /metrics; updated by the engine thread, read from any."""

    def __init__(self, window: int = 1000):
        self.lock = threading.Lock()
        self.counts = collections.Counter()
        self.ttft: collections.deque = collections.deque(maxlen=window)
        self.ttfa: collections.deque = collections.deque(maxlen=window)
        self.token_times: collections.deque = collections.deque(maxlen=100_000)  # when each text token came out

    def add(self, name: str, value: float = 1) -> None:
        with self.lock:
            self.counts[name] += value

    def tokens_per_second(self, horizon: float = 10.0) -> float:
        now = time.perf_counter()
        with self.lock:
            recent = sum(1 for t in self.token_times if now - t <= horizon)
        return recent / horizon


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of values, NaN when there are none."""
    return float(np.percentile(np.asarray(values, np.float64), q)) if len(values) else float("nan")


class ServingEngine:
    """Continuous batching over an `OmniPipeline`'s params and compiled steps (module docstring).

    slots: rows per stage. talker_max_new_tokens: the talker's budget per reply (frames + 1), as offline.
    talker_sampling: the talker's settings for every request (static: one compiled talker step); its draws
    use each request's own key. chunk_frames / first_chunk_frames: the streamed audio's chunk sizes.
    prefills_per_step: the admission policy (module docstring). max_waiting: queued requests beyond which
    `submit` raises QueueFull.
    """

    def __init__(self, pipe, *, slots: int = 8, talker_max_new_tokens: int = 1024,
                 talker_sampling: TalkerSampling | None = None, chunk_frames: int = DEFAULT_CHUNK_FRAMES,
                 first_chunk_frames: int = DEFAULT_FIRST_CHUNK_FRAMES, prefills_per_step: int = 1,
                 max_waiting: int = 256):
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise UsageError(f"slots must be a positive integer, got {slots!r}")
        if isinstance(prefills_per_step, bool) or not isinstance(prefills_per_step, int) or prefills_per_step < 1:
            raise UsageError(f"prefills_per_step must be a positive integer, got {prefills_per_step!r}")
        if talker_max_new_tokens < 2:
            raise UsageError(f"talker_max_new_tokens must be >= 2 (frames + 1), got {talker_max_new_tokens}")
        self.pipe = pipe
        self.slots = slots
        self.max_len = pipe.max_len
        self.talker_max_new_tokens = int(talker_max_new_tokens)
        self.talker_sampling = talker_sampling or TalkerSampling()
        self.chunk_frames = check_chunk_frames(chunk_frames)
        self.first_chunk_frames = check_chunk_frames(first_chunk_frames, "first_chunk_frames")
        self.prefills_per_step = prefills_per_step
        self.max_waiting = max_waiting
        self.eos = tuple(pipe.tokenizer.eos_token_ids)
        self.metrics = Metrics()
        mesh = pipe.mesh
        jit = jax.jit if mesh is None else functools.partial(sjit.sharded_jit, mesh=mesh)
        engine = pipe.engine
        self._thinker_step = jit(functools.partial(slots_lib.thinker_step, model=engine.model), donate_argnums=(1,))
        self._thinker_insert = jit(slots_lib.thinker_insert, donate_argnums=(0,))
        self._thinker_free = jit(slots_lib.thinker_free, donate_argnums=(0,))
        self._tslots = self._vocoder = None  # speech rows: made by _reset_states
        if pipe.has_speech:
            talker = pipe.talker
            self._talker_step = jit(functools.partial(slots_lib.talker_slots_step, talker.model),
                                    static_argnames=("sampling",), donate_argnums=(1,))
            self._talker_insert = jit(slots_lib.talker_insert, donate_argnums=(0,))
            self._columns = jax.jit(functools.partial(_columns, Talker(pipe.config, talker.dtype, talker.dtype)),
                                    donate_argnums=())
            self._put_cols = jax.jit(_put_cols, donate_argnums=(0,))
            # The talker prompt is the user turn (at most the thinker's prompt) + a few specials.
            self.talker_len = buckets.bucket(self.max_len + 16) + buckets.bucket(self.talker_max_new_tokens)
        self._reset_states()
        self._rows: dict[int, _Row] = {}
        self._waiting: collections.deque[_Row] = collections.deque()
        self._cond = threading.Condition()
        self._accepting = True
        self._stop = False
        self._next_id = 0
        self._thread: threading.Thread | None = None
        self.steps = 0

    def _reset_states(self) -> None:
        """Fresh slot states, every slot free (at start, and after a step failed midway: its donated inputs
        may be gone)."""
        self._slots = slots_lib.ThinkerSlots.create(self.pipe.engine.steps.cache(self.slots, self.max_len), self.eos)
        self._free = list(range(self.slots))
        self._tslots = None  # made from the first talker prefill's shapes
        if self.pipe.has_speech:
            self._vocoder = VocoderStream(self.pipe.params["code2wav"], self.pipe.config, self.chunk_frames,
                                          self.slots, self.pipe.dtype)
            hidden, dt = self.pipe.config.talker.text.hidden_size, self.pipe.talker.dtype
            self._cols = (jnp.zeros((self.slots, 1, hidden), dt), jnp.zeros((self.slots, 1, hidden), dt))

    # -- public, any thread ---------------------------------------------------------------------------
    def start(self) -> "ServingEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="omni-serving-engine", daemon=True)
            self._thread.start()
        return self

    def check(self, req: ServeRequest) -> None:
        """UsageError if the request cannot run here (prompt, budget, speaker, settings), before queueing it."""
        from omni_jax.runtime import prompt as prompt_lib

        if not req.prompt_ids:
            raise UsageError("the prompt is empty (0 tokens)")
        if isinstance(req.max_new_tokens, bool) or not isinstance(req.max_new_tokens, int) or req.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be a positive integer, got {req.max_new_tokens!r}")
        prompt_lib.check_fits(self.pipe.config, len(req.prompt_ids), req.audio, req.max_new_tokens, self.max_len,
                              visual=req.visual)
        self.pipe.engine.bucket_for(len(req.prompt_ids))
        if req.speech:
            if not self.pipe.has_speech:
                raise UsageError("this checkpoint has no talker/code2wav weights: it answers in text only")
            self.pipe.config.talker.speaker(req.speaker)
        SamplingParams(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p)  # range checks
        if req.audio and self.pipe.audio is None:
            raise UsageError("the request has audio, but this checkpoint has no audio encoder")

    def submit(self, req: ServeRequest, sink: Callable[[Event], None] | None = None) -> Handle:
        """Queue a request; events go to sink(event) (called on the engine thread) or to the handle's iterator."""
        self.check(req)
        with self._cond:
            if not self._accepting:
                raise EngineStopped("the server is shutting down; it takes no new requests")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting; retry later")
            handle = Handle(self._next_id, sink)
            self._next_id += 1
            self._waiting.append(_Row(handle, req, time.perf_counter()))
            self.metrics.add("requests_total")
            self._cond.notify()
        return handle

    def stop(self, grace_s: float = 30.0) -> None:
        """Take no new requests, let in-flight ones finish for up to grace_s, cancel the rest, stop the loop."""
        with self._cond:
            self._accepting = False
            self._cond.notify()
        deadline = time.perf_counter() + grace_s
        while self.busy and time.perf_counter() < deadline:
            time.sleep(0.02)
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def stopping(self) -> bool:
        return not self._accepting

    @property
    def busy(self) -> bool:
        return bool(self._rows or self._waiting)

    def snapshot(self) -> dict[str, float]:
        """Gauges and counters for /metrics."""
        m = self.metrics
        with m.lock:
            counts = dict(m.counts)
            ttft, ttfa = list(m.ttft), list(m.ttfa)
        out = {"slots": self.slots, "active_slots": len(self._rows), "queue_length": len(self._waiting),
               "steps": self.steps, "tokens_per_second": m.tokens_per_second()}
        out.update({k: float(v) for k, v in counts.items()})
        for name, values in (("time_to_first_token", ttft), ("time_to_first_audio", ttfa)):
            for q in (50, 95, 99):
                out[f"{name}_p{q}"] = percentile(values, q)
        return out

    # -- the loop (engine thread) ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._rows and not self._waiting:
                    self._cond.wait()
                if self._stop:
                    break
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - a failed step fails the requests in it, not the server
                log.exception("serving step failed")
                rows = list(self._rows.values())
                self._rows.clear()
                self._reset_states()
                for row in rows:
                    self._fail(row, e)
        for row in list(self._rows.values()) + list(self._waiting):
            self._fail(row, EngineStopped("the server shut down before the request finished"))
        self._waiting.clear()

    def step(self) -> None:
        """One scheduler iteration (module docstring). Public for callers that drive the engine themselves."""
        self.steps += 1
        with self._cond:
            gone = [r for r in self._waiting if r.handle.cancelled]
            for r in gone:
                self._waiting.remove(r)
        for row in gone + [r for r in self._rows.values() if r.handle.cancelled]:
            if row.slot >= 0:
                self._release(row)
            self.metrics.add("requests_cancelled")
            row.handle._emit(Event("error", error=Cancelled("cancelled"), t=row.now()))
        budget = self.prefills_per_step if self._rows else self.slots
        while budget and self._free:
            with self._cond:
                if not self._waiting:
                    break
                row = self._waiting.popleft()
            budget -= 1
            try:
                self._admit(row)
            except Exception as e:  # noqa: BLE001 - bad input found late (e.g. audio) fails only this request
                self._fail(row, e)
        if any(not r.thinker_done for r in self._rows.values()):
            self._thinker()
        if self._tslots is not None and any(not r.talker_done for r in self._rows.values()):
            self._talker()
        if self._vocoder is not None:
            self._vocode()
        for row in list(self._rows.values()):
            if row.thinker_done and row.talker_done and row.decoded == len(row.frames):
                self._finish(row)

    def _admit(self, row: _Row) -> None:
        pipe, req = self.pipe, row.req
        row.slot = self._free.pop(0)
        self._rows[row.slot] = row
        with self.metrics.lock:
            self.metrics.counts["peak_active_slots"] = max(self.metrics.counts["peak_active_slots"], len(self._rows))
        row.timings["queue_s"] = row.now()
        row.detok = TextDeltas(pipe.tokenizer, self.eos)
        seed = secrets.randbits(31) if req.seed is None else int(req.seed)
        if req.audio or req.visual:
            row.mm_rows = pipe.encode_inputs([req.prompt_ids], [req.audio], req.max_new_tokens, [req.visual])
            row.timings["encoders_s"] = row.now()
        pre = pipe.engine.start([req.prompt_ids], req.max_new_tokens, SamplingParams.greedy(), 0, collect_hidden=True,
                                eos_ids=self.eos, mm_rows=row.mm_rows)
        state = pre.state
        self._slots, first, done = self._thinker_insert(
            self._slots, state.cache, state.logits, state.rope_deltas[0], np.int32(row.slot),
            np.int32(req.max_new_tokens), jax.random.PRNGKey(seed), np.float32(req.temperature),
            np.int32(req.top_k), np.float32(req.top_p))
        row.prompt_logits = jnp.copy(state.logits[0])
        self._take(row, int(first))
        if req.speech and not row.thinker_done:  # a one-token reply has nothing to voice (MIN_SPEECH_TOKENS)
            tstate, eos_col, pad_col = start_talker_row(
                pipe, req.prompt_ids, state, row.tokens[0], req.speaker, self.eos, self.talker_max_new_tokens,
                self.talker_sampling, jax.random.PRNGKey(seed + 1), cache_len=self.talker_len, visual=req.visual,
                audio=req.audio)
            if self._tslots is None:
                self._tslots = jax.jit(slots_lib.talker_slots, static_argnums=1)(tstate, self.slots)
            self._tslots = self._talker_insert(self._tslots, tstate, np.int32(row.slot))
            self._cols = self._put_cols(self._cols, eos_col, pad_col, np.int32(row.slot))
            self._vocoder.reset([row.slot])
            row.speaking = True
            row.talker_done = bool(np.asarray(tstate.done)[0])
            row.timings["talker_prefill_s"] = row.now()
        pipe.engine.release(state)

    def _take(self, row: _Row, token: int) -> None:
        row.tokens.append(token)
        row.thinker_done = token in self.eos or len(row.tokens) >= row.req.max_new_tokens
        delta = row.detok.push(token)
        if row.thinker_done:
            delta += row.detok.flush()
        row.timings.setdefault("time_to_first_token_s", row.now())
        if len(row.tokens) == 1:
            with self.metrics.lock:
                self.metrics.ttft.append(row.timings["time_to_first_token_s"])
        with self.metrics.lock:
            self.metrics.token_times.append(time.perf_counter())
            self.metrics.counts["generated_tokens_total"] += 1
        row.handle._emit(Event("text", text=delta, token_ids=[token], t=row.now()))

    def _thinker(self) -> None:
        self._slots, toks, emitted = self._thinker_step(self.pipe.engine.params, self._slots)
        toks, emitted = np.asarray(toks), np.asarray(emitted)
        for slot, row in list(self._rows.items()):
            if not row.thinker_done and emitted[slot]:
                self._take(row, int(toks[slot]))

    def _talker(self) -> None:
        ids = np.zeros((self.slots,), np.int32)
        kind = np.zeros((self.slots,), np.int32)  # 0 text column, 1 tts_eos, 2 tts_pad
        active = np.zeros((self.slots,), bool)
        for slot, row in self._rows.items():
            if row.talker_done:
                continue
            j = len(row.frames) + 1  # column s carries reply token s+1
            if j < len(row.tokens):
                last = row.thinker_done and j == len(row.tokens) - 1
                kind[slot], ids[slot], active[slot] = (1 if last else 0), row.tokens[j], True
            elif row.thinker_done:
                kind[slot], active[slot] = 2, True
        if not active.any():
            return
        params = self.pipe.params
        cols = self._columns(params["talker"], params["thinker"]["embed_tokens"]["embedding"], ids, kind, *self._cols)
        self._tslots, codes, valid = self._talker_step(params["talker"], self._tslots, cols, active,
                                                       sampling=self.talker_sampling)
        codes, valid, done = np.asarray(codes), np.asarray(valid), np.asarray(self._tslots.done)
        for slot, row in self._rows.items():
            if not active[slot]:
                continue
            if valid[slot]:
                row.frames.append(codes[slot])
                row.timings.setdefault("time_to_first_frame_s", row.now())
            # HF: at most max_new - 1 frames (the last group-0 code never gets its residual groups).
            row.talker_done = bool(done[slot]) or len(row.frames) >= self.talker_max_new_tokens - 1

    def _vocode(self) -> None:
        by_width: dict[int, list[_Row]] = {}
        for row in self._rows.values():
            if not row.speaking:
                continue
            width = self.first_chunk_frames if row.decoded == 0 else self.chunk_frames
            pending = len(row.frames) - row.decoded
            if pending >= width or (row.talker_done and pending > 0):
                by_width.setdefault(width, []).append(row)
        for width, rows in sorted(by_width.items()):
            codes: list[np.ndarray | None] = [None] * self.slots
            for row in rows:
                n = min(width, len(row.frames) - row.decoded)
                codes[row.slot] = np.stack(row.frames[row.decoded:row.decoded + n], axis=1)
            try:
                wavs = self._vocoder.decode(codes, width)
            except NumericalError as e:
                for row in rows:
                    self._fail(row, e)
                continue
            for row in rows:
                n = codes[row.slot].shape[1]
                row.decoded += n
                row.wav.append(wavs[row.slot])
                if "time_to_first_audio_s" not in row.timings:
                    row.timings["time_to_first_audio_s"] = row.now()
                    with self.metrics.lock:
                        self.metrics.ttfa.append(row.timings["time_to_first_audio_s"])
                self.metrics.add("audio_seconds_total", len(wavs[row.slot]) / self.pipe.sample_rate)
                row.handle._emit(Event("audio", audio=wavs[row.slot], frames=n, t=row.now()))

    def _finish(self, row: _Row) -> None:
        try:
            slot = row.slot
            flags = [("thinker", "thinker logits", self._slots.finite[slot])]
            if row.speaking:
                flags += [("talker", "talker logits", self._tslots.finite[slot]),
                          ("code predictor", "code predictor logits", self._tslots.cp_finite[slot])]
            from omni_jax.errors import check_finite

            check_finite(*[(s, d, bool(jax.device_get(f))) for s, d, f in flags])
        except NumericalError as e:
            self._fail(row, e)
            return
        row.timings["total_s"] = row.now()
        q = self.pipe.config.talker.num_code_groups if self.pipe.has_speech else 16
        codes = np.stack(row.frames, axis=1).astype(np.int32) if row.frames else np.zeros((q, 0), np.int32)
        text, reasoning = self.pipe._answer_and_reasoning(row.tokens, self.eos)
        result = Result(
            text=text, reasoning=reasoning, prompt_ids=list(row.req.prompt_ids), token_ids=list(row.tokens),
            finish_reason="eos" if row.tokens and row.tokens[-1] in self.eos else "length",
            codes=codes if row.req.speech else None,
            wav=(np.concatenate(row.wav) if row.wav else np.zeros((0,), np.float32)) if row.req.speech else None,
            sample_rate=self.pipe.sample_rate, timings=dict(row.timings),
            **PromptRows.result_fields(None if row.mm_rows is None else row.mm_rows[0], row.req.prompt_ids,
                                       self.pipe.config.thinker),
            prompt_logits=np.asarray(row.prompt_logits))
        self._release(row)
        self.metrics.add("requests_completed")
        row.handle._emit(Event("done", result=result, t=row.now()))

    def _fail(self, row: _Row, error: Exception) -> None:
        try:
            if row.slot >= 0 and self._rows.get(row.slot) is row:
                self._release(row)
        finally:
            self._emit_error(row, error)

    def _emit_error(self, row: _Row, error: Exception) -> None:
        self.metrics.add("requests_failed")
        if not row.handle.finished:
            row.handle._emit(Event("error", error=error, t=row.now()))

    def _release(self, row: _Row) -> None:
        slot = row.slot
        del self._rows[slot]
        if not row.thinker_done:
            mask = np.zeros((self.slots,), bool)
            mask[slot] = True
            self._slots = self._thinker_free(self._slots, mask)
        self._free.append(slot)
        self._free.sort()


def _columns(model: Talker, talker_params, embed_table, ids, kind, eos_cols, pad_cols):
    """The talker's next text column per row [B, 1, H]: text_projection of reply token ids [B] (kind 0), or the
    row's tts_eos (kind 1) / tts_pad (kind 2) column."""
    emb = jnp.take(embed_table, ids, axis=0).astype(model.dtype)
    text = model.apply({"params": talker_params}, emb, method=Talker.project_text)[:, None, :].astype(eos_cols.dtype)
    k = kind[:, None, None]
    return jnp.where(k == 0, text, jnp.where(k == 1, eos_cols, pad_cols))


def _put_cols(cols, eos_col, pad_col, slot):
    eos_cols, pad_cols = cols
    return (jax.lax.dynamic_update_slice(eos_cols, eos_col.astype(eos_cols.dtype), (slot, 0, 0)),
            jax.lax.dynamic_update_slice(pad_cols, pad_col.astype(pad_cols.dtype), (slot, 0, 0)))
