"""Batch job: prompts.jsonl -> <id>.wav + results.jsonl, resumable and crash-safe.

Input: one JSON object per line with `id`, `prompt` or `messages` (string content, or content parts
`{"type": "text", "text": ...}` / `{"type": "audio" | "image" | "video", <kind>: "file"}`), optional `audio`,
`image`, `video` (a file or a list of files asked about with `prompt`; relative paths are relative to the input
file), `use_audio_in_video` (each video's own audio track joins the prompt), `speaker`, `system`,
and overrides of the shared sampling flags (omni_jax.cli.flag_groups: `max_new_tokens`, `greedy`,
`temperature`, `top_k`, `top_p`, `repetition_penalty` and their `talker_*` twins). Every output file is written under a temporary name and
renamed, so a killed job never leaves a truncated WAV or a partial JSONL line; a rerun skips the
ids already in results.jsonl (and redoes those whose WAV is missing).

The input is validated against the config and tokenizer before the model loads, so bad lines
(reported with their line numbers) cost nothing and --strict fails before any heavy work.

  python launch/batch.py --input=prompts.jsonl --output_dir=out [--checkpoint=DIR] [--mesh=tp4ep8]
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from omni_jax import cli  # noqa: E402  (jax-free: bad flags fail before jax loads)
from omni_jax.cli import checks, flag_groups as shared  # noqa: E402
from omni_jax.errors import OmniError, UsageError  # noqa: E402

FLAGS = flags.FLAGS
shared.define_model_flags()
shared.define_sampling_flags()  # per-line keys override them (shared.sampling_values)
flags.DEFINE_string("input", None, "prompts.jsonl: one JSON object per line.")
flags.DEFINE_string("output_dir", None, "Where <id>.wav and results.jsonl go.")
flags.DEFINE_integer("batch_size", 4, "Prompts per compiled batch.", lower_bound=1)
flags.DEFINE_bool("text_only", False, "Skip the talker: text only, no WAVs.")
flags.DEFINE_bool("strict", False, "Fail (non-zero exit) on the first bad input line or failed batch instead of "
                  "skipping it.")

RESULTS = "results.jsonl"
TMP_TAG = ".tmp-"
# Keys of the shared sampling flag group a line may override (each batch uses seed + its index).
INT_KEYS = {k for k, v in shared.SAMPLING_DEFAULTS.items() if type(v) is int}
FLOAT_KEYS = {k for k, v in shared.SAMPLING_DEFAULTS.items() if type(v) is float}
SAMPLING_KEYS = set(shared.SAMPLING_DEFAULTS)
MEDIA_KEYS = ("image", "video", "audio")  # the order their parts take in a `prompt` line's user turn
ITEM_KEYS = {"id", "prompt", "messages", "speaker", "system", "use_audio_in_video", *MEDIA_KEYS} | SAMPLING_KEYS
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


@dataclasses.dataclass
class Item:
    line: int
    id: str
    request: object  # omni_jax.runtime.types.Request
    sampling: dict
    prompt_ids: list[int] | None = None  # templated, placeholders expanded (when validated with a tokenizer)
    audio: list | None = None  # log-mel features of each clip, in order
    visual: list | None = None  # images / videos preprocessed (omni_jax.processing.vision.VisualInput), in order


class BadLine(ValueError):
    pass


def _fsync_dir(path: str) -> None:
    """Make a rename durable across power loss (a killed process alone cannot lose it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes) -> None:
    """Write to a temp name in the same dir, fsync, rename: readers see the old file or the whole new one."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}{TMP_TAG}{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(directory)


def clean_temp_files(out_dir: str) -> int:
    n = 0
    for name in os.listdir(out_dir):
        if TMP_TAG in name:
            os.remove(os.path.join(out_dir, name))
            n += 1
    return n


def load_done(out_dir: str) -> dict[str, dict]:
    """Completed items. Only whole lines exist (results.jsonl is replaced atomically), but be tolerant anyway."""
    path = os.path.join(out_dir, RESULTS)
    done: dict[str, dict] = {}
    if not os.path.exists(path):
        return done
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
                done[str(rec["id"])] = rec
            except (json.JSONDecodeError, KeyError, TypeError):
                logging.warning("%s line %d is unreadable; that item will be redone", path, n)
    return done


def is_complete(rec: dict, out_dir: str, text_only: bool) -> bool:
    """A record counts as done unless this run wants speech and its WAV is absent (e.g. a text-only earlier run)."""
    if text_only:
        return True
    wav = rec.get("wav")
    return isinstance(wav, str) and os.path.isfile(os.path.join(out_dir, wav))


def _check_sampling(n: int, obj: dict) -> dict:
    """Type- and range-check per-line sampling overrides (so a bad value fails its line, not a whole batch)."""
    s = {}
    for k in SAMPLING_KEYS & set(obj):
        v = obj[k]
        if k in INT_KEYS:
            ok, want = isinstance(v, int) and not isinstance(v, bool), "an integer"
        elif k in FLOAT_KEYS:
            ok, want = isinstance(v, (int, float)) and not isinstance(v, bool), "a number"
        else:
            ok, want = isinstance(v, bool), "true or false"
        if not ok:
            raise BadLine(f"line {n}: '{k}' must be {want}, got {v!r}")
        s[k] = float(v) if k in FLOAT_KEYS else v
    for k in ("max_new_tokens", "talker_max_new_tokens"):
        if k in s and s[k] < 1:
            raise BadLine(f"line {n}: '{k}' must be >= 1, got {s[k]}")
    try:
        shared.samplings(shared.sampling_values(s))
    except UsageError as e:
        raise BadLine(f"line {n}: {e}") from None
    return s


def _resolve_paths(parts, base_dir: str | None):
    """Audio, image and video paths relative to the input file's directory."""
    if base_dir is None:
        return parts
    fix = lambda p: p if not isinstance(p, str) or os.path.isabs(p) else os.path.join(base_dir, p)  # noqa: E731
    out = []
    for m in parts:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            content = [dict(c, **{c["type"]: fix(c.get(c["type"]))})
                       if isinstance(c, dict) and c.get("type") in MEDIA_KEYS else c for c in content]
            m = dict(m, content=content)
        out.append(m)
    return out


def _messages_of(n: int, obj: dict):
    """The line's messages: `messages` as given, or `prompt` (+ its images, videos and audio clips) as one user
    turn."""
    given = [k for k in MEDIA_KEYS if k in obj]
    if not given:
        return obj.get("prompt"), obj.get("messages")
    if "prompt" not in obj:
        raise BadLine(f"line {n}: '{given[0]}' goes with 'prompt'; put {given[0]} parts into 'messages' instead")
    parts = []
    for key in given:
        files = obj[key] if isinstance(obj[key], list) else [obj[key]]
        if not files or not all(isinstance(c, str) and c for c in files):
            raise BadLine(f"line {n}: '{key}' must be a file path or a non-empty list of file paths")
        parts += [{"type": key, key: c} for c in files]
    if obj["prompt"].strip():
        parts.append({"type": "text", "text": obj["prompt"]})
    return None, [{"role": "user", "content": parts}]


def parse_line(n: int, raw: str, seen: set[str], speakers: list[str], text_only: bool, tokenizer=None,
               max_len: int | None = None, config=None, base_dir: str | None = None) -> Item:
    """One input line -> Item, or BadLine naming the line and what is wrong with it.

    With a tokenizer and config, the prompt is also templated, its audio read, and checked against max_len
    (prompt + max_new_tokens).
    """
    from omni_jax.runtime.types import Request

    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BadLine(f"line {n}: invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise BadLine(f"line {n}: expected a JSON object, got {type(obj).__name__}")
    if "id" not in obj:
        raise BadLine(f"line {n}: missing 'id'")
    item_id = obj["id"]
    if not isinstance(item_id, (str, int)) or isinstance(item_id, bool) or not _SAFE_ID.match(str(item_id)):
        raise BadLine(f"line {n}: id {item_id!r} must be 1-128 characters of [A-Za-z0-9._-] (it names the WAV file)")
    item_id = str(item_id)
    if item_id in seen:
        raise BadLine(f"line {n}: duplicate id {item_id!r}")
    unknown = set(obj) - ITEM_KEYS
    if unknown:
        raise BadLine(f"line {n}: unknown keys {sorted(unknown)}; allowed: {sorted(ITEM_KEYS)}")
    if ("prompt" in obj) == ("messages" in obj):
        raise BadLine(f"line {n}: needs exactly one of 'prompt' or 'messages'")
    if "prompt" in obj and not isinstance(obj["prompt"], str):
        raise BadLine(f"line {n}: 'prompt' must be a string")
    if "system" in obj and not isinstance(obj["system"], str):
        raise BadLine(f"line {n}: 'system' must be a string")
    speaker = obj.get("speaker", FLAGS.speaker)
    if not text_only and (not isinstance(speaker, str) or speaker.lower() not in speakers):
        raise BadLine(f"line {n}: unknown speaker {speaker!r}; known: {', '.join(speakers)}")
    sampling = _check_sampling(n, obj)
    max_new = sampling.get("max_new_tokens", FLAGS.max_new_tokens)
    prompt, messages = _messages_of(n, obj)
    if isinstance(messages, list):
        messages = _resolve_paths(messages, base_dir)
    with_audio = obj.get("use_audio_in_video", False)
    if not isinstance(with_audio, bool):
        raise BadLine(f"line {n}: 'use_audio_in_video' must be true or false")
    req = Request(prompt=prompt, messages=messages, system=obj.get("system"),
                  speaker=speaker if isinstance(speaker, str) else FLAGS.speaker, use_audio_in_video=with_audio)
    ids = feats = visual = None
    try:
        messages = req.to_messages()
        if tokenizer is not None and config is not None:
            from omni_jax.processing.vision import processor_for_model
            from omni_jax.runtime import prompt as prompt_lib

            processor = processor_for_model(FLAGS.checkpoint, config.thinker.vision) if config.thinker.vision else None
            ids, feats, visual = prompt_lib.encode_messages(tokenizer, config, messages, processor=processor,
                                                            use_audio_in_video=with_audio)
            if max_len is not None:
                prompt_lib.check_fits(config, len(ids), feats, max_new, max_len, "the prompt", visual)
    except (ValueError, TypeError, AttributeError) as e:
        if isinstance(e, BadLine):
            raise
        raise BadLine(f"line {n}: {e}") from None
    seen.add(item_id)
    return Item(n, item_id, req, sampling, ids, feats, visual)


def sampling_for(item: Item):
    """(thinker sampling, talker sampling, max_new_tokens, talker_max_new_tokens) of a line: the shared flags
    with the line's overrides."""
    values = shared.sampling_values(item.sampling)
    thinker, talker = shared.samplings(values)
    return thinker, talker, int(values["max_new_tokens"]), int(values["talker_max_new_tokens"])


def wav_bytes(wav, sample_rate: int) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wav, sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _job_config():
    """The model config without loading weights: the checkpoint's config.json, or the tiny default."""
    from omni_jax.config import load_config
    from omni_jax.runtime.loading import DEFAULT_CONFIG

    if FLAGS.checkpoint is None:
        return load_config(DEFAULT_CONFIG)
    if not os.path.isdir(FLAGS.checkpoint):
        raise app.UsageError(f"--checkpoint {FLAGS.checkpoint!r} is not a directory")
    try:
        return load_config(FLAGS.checkpoint)
    except FileNotFoundError:
        raise app.UsageError(f"--checkpoint {FLAGS.checkpoint!r} has no config.json") from None


def _load_pipeline(config, mesh):
    from omni_jax.runtime.pipeline import OmniPipeline

    return OmniPipeline.load(FLAGS.checkpoint, dtype=shared.parse_dtype_flag(FLAGS.dtype), config=config,
                             max_len=FLAGS.max_len, mesh=mesh, prefill_chunk=FLAGS.prefill_chunk)


def _bad(msg: str) -> None:
    print(f"bad input: {msg}", file=sys.stderr, flush=True)
    if FLAGS.strict:
        print("stopping: --strict", file=sys.stderr, flush=True)
        sys.exit(2)


def main(argv):
    del argv
    if not FLAGS.input or not FLAGS.output_dir:
        raise app.UsageError("--input and --output_dir are required")
    if not os.path.isfile(FLAGS.input):
        raise app.UsageError(f"--input {FLAGS.input!r} is not a file")
    checks.check_output_dir(FLAGS.output_dir, "--output_dir")  # before any work; creates nothing
    from omni_jax.sharding import mesh as mesh_lib

    mesh_lib.maybe_initialize_distributed()
    from tqdm import tqdm

    from omni_jax.processing.tokenizer import load_tokenizer

    config = _job_config()
    if not FLAGS.text_only:
        checks.check_speech(config, FLAGS.checkpoint)
    speakers = sorted(name.lower() for name, _ in config.talker.speaker_id)
    if not FLAGS.text_only and FLAGS.speaker.lower() not in speakers:
        raise app.UsageError(f"--speaker {FLAGS.speaker!r} is unknown; known: {', '.join(speakers)}")
    mesh = shared.make_mesh_flag(FLAGS.mesh, config)
    shared.parse_dtype_flag(FLAGS.dtype)
    tokenizer = load_tokenizer(FLAGS.checkpoint)

    # Validate every line before loading weights: bad lines cost nothing and --strict stops here.
    items, bad = [], []
    seen: set[str] = set()
    with open(FLAGS.input, "rb") as f:
        offset = 0
        for n, raw_bytes in enumerate(f, 1):
            line_offset, offset = offset, offset + len(raw_bytes)
            try:
                try:
                    raw = raw_bytes.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise BadLine(f"line {n}: invalid UTF-8 (byte 0x{raw_bytes[e.start]:02x} at byte offset "
                                  f"{line_offset + e.start} of {FLAGS.input}); re-save the file as UTF-8") from None
                if not raw.strip():
                    continue
                items.append(parse_line(n, raw, seen, speakers, FLAGS.text_only, tokenizer, FLAGS.max_len, config,
                                        os.path.dirname(os.path.abspath(FLAGS.input))))
            except BadLine as e:
                bad.append(str(e))
                _bad(str(e))

    primary = mesh_lib.is_primary()
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    if primary:
        removed = clean_temp_files(FLAGS.output_dir)
        if removed:
            logging.info("removed %d temporary files left by an interrupted run", removed)
    done = load_done(FLAGS.output_dir)
    todo = [it for it in items if not (it.id in done and is_complete(done[it.id], FLAGS.output_dir, FLAGS.text_only))]
    if len(todo) < len(items) and primary:
        print(f"resuming: {len(items) - len(todo)} of {len(items)} items already done", flush=True)

    # Items sharing sampling settings share a compiled batch.
    groups: dict[tuple, list[Item]] = {}
    for it in todo:
        groups.setdefault(tuple(sorted(it.sampling.items())), []).append(it)
    batches = [g[i : i + FLAGS.batch_size] for g in groups.values() for i in range(0, len(g), FLAGS.batch_size)]

    pipe = None
    if batches:
        pipe = _load_pipeline(config, mesh)
        if pipe.random_weights and primary:
            print("NOTE: no --checkpoint given: running the tiny embedded model with RANDOM weights "
                  "(text and audio are noise).", flush=True)

    failures, audio_s, compute_s = 0, 0.0, 0.0
    bar = tqdm(total=len(todo), unit="item", disable=not primary)
    for bi, batch in enumerate(batches):
        thinker_s, talker_s, max_new, talker_max = sampling_for(batch[0])
        t0 = time.perf_counter()
        try:
            # The ids, audio features and images / videos validated above: each file is read once.
            results = pipe.generate_ids([it.prompt_ids for it in batch], [it.request.speaker for it in batch],
                                        audio=[it.audio for it in batch], visual=[it.visual for it in batch],
                                        text_only=FLAGS.text_only,
                                        max_new_tokens=max_new, talker_max_new_tokens=talker_max, sampling=thinker_s,
                                        talker_sampling=talker_s, seed=FLAGS.seed + bi)
        except Exception as e:  # noqa: BLE001 - one failing batch must not end the job
            failures += len(batch)
            if isinstance(e, OmniError):  # a known failure (e.g. NaN from bad weights): its message says it all
                logging.error("batch of ids %s failed: %s", [it.id for it in batch], e)
            else:
                logging.exception("batch of ids %s failed: %s", [it.id for it in batch], e)
            print(f"failed: ids {[it.id for it in batch]}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            if FLAGS.strict:
                print("stopping: --strict", file=sys.stderr, flush=True)
                sys.exit(1)
            bar.update(len(batch))
            continue
        elapsed = time.perf_counter() - t0
        compute_s += elapsed
        if primary:
            for it, res in zip(batch, results):
                rec = {"id": it.id, "line": it.line, "text": res.text,
                       **({"reasoning": res.reasoning} if res.reasoning is not None else {}),
                       "prompt_tokens": len(res.prompt_ids),
                       "generated_tokens": len(res.token_ids), "finish_reason": res.finish_reason,
                       "audio_seconds": round(res.audio_seconds, 6), "timings": {**res.timings, "batch_s": elapsed}}
                if res.wav is not None:
                    # WAV first, then the record that points at it: a record never names a missing/partial file.
                    atomic_write(os.path.join(FLAGS.output_dir, f"{it.id}.wav"), wav_bytes(res.wav, res.sample_rate))
                    rec.update(wav=f"{it.id}.wav", samples=int(len(res.wav)), sample_rate=res.sample_rate,
                               frames=int(res.codes.shape[-1]))
                audio_s += res.audio_seconds
                done[it.id] = rec
                # Rewrite the whole file atomically: a kill leaves either the old or the new file, never half a line.
                body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done.values())
                atomic_write(os.path.join(FLAGS.output_dir, RESULTS), body.encode("utf-8"))
        bar.update(len(batch))
    bar.close()
    rtf = compute_s / audio_s if audio_s > 0 else float("nan")
    summary = {"items": len(items), "done_now": len(todo) - failures, "skipped_done": len(items) - len(todo),
               "bad_lines": len(bad), "failures": failures, "audio_seconds": round(audio_s, 3),
               "compute_seconds": round(compute_s, 3), "real_time_factor": None if audio_s == 0 else round(rtf, 3)}
    if primary:
        print("summary: " + json.dumps(summary), flush=True)


flags.mark_flags_as_required(["input", "output_dir"])

if __name__ == "__main__":
    cli.run(main)
