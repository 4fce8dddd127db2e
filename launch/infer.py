"""Command-line text + speech generation (thinker -> talker -> Code2Wav) with OmniPipeline.

  python launch/infer.py --prompt="你好,世界"                       # text + output.wav (24 kHz)
  python launch/infer.py --checkpoint=DIR --prompt_file=q.txt --speaker=Chelsie --output=/tmp/a.wav
  python launch/infer.py --prompt="hi" --text_only --temperature=0.7 --top_p=0.8
  python launch/infer.py --input_ids=151644,872,198,... --greedy --talker_greedy --dump_dir=/tmp/out
  python launch/infer.py --interactive --checkpoint=DIR         # chat on stdin; /reset, /exit
  python launch/infer.py --prompt="hi" --stream --output=- | aplay -f S16_LE -r 24000 -c 1   # streamed speech
  python launch/infer.py --checkpoint=DIR --audio=question.wav [--audio=more.flac] [--prompt="..."]  # speech in
  python launch/infer.py --checkpoint=DIR --image=cat.jpg --prompt="What is this?"               # images in
  python launch/infer.py --checkpoint=DIR --video=clip.mp4 --use_audio_in_video --prompt="What happens?"

Speech is on by default and written to --output (default output.wav; --output= writes none).
--dump_dir additionally writes tokens.json (prompt ids with the audio placeholders expanded),
prompt_logits.npy (float32 [vocab] at the last prompt position), codes.npy (int32 [16, frames]),
audio.wav, position_ids.npy (float32 [3, prompt length]: the thinker's M-RoPE positions), with --audio
audio_embeds.npy (float32 [audio tokens, hidden]: the encoder rows) and with --image / --video
vision_embeds.npy (float32 [image + video tokens, hidden]: the merger rows, in prompt order).
--interactive keeps the conversation (each reply is appended to the message history), writes
turn_<n>.wav next to --output and, with --dump_dir, turn_<n>/{tokens.json,...}; a line
`/audio PATH`, `/image PATH` or `/video PATH` is a turn with that file as the user's message.
Without --checkpoint the tiny config runs with deterministic random weights (smoke test only).
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from omni_jax import cli  # noqa: E402  (jax-free: bad flags fail before jax loads)
from omni_jax.cli import checks, flag_groups as shared  # noqa: E402
from omni_jax.errors import UsageError  # noqa: E402

FLAGS = flags.FLAGS
shared.define_model_flags()
shared.define_sampling_flags()
flags.DEFINE_string("prompt", None, "User message (ChatML template applied).")
flags.DEFINE_string("prompt_file", None, "File whose contents are the user message.")
flags.DEFINE_string("input_ids", None, "Comma-separated exact prompt token ids (no template).")
flags.DEFINE_multi_string("audio", [], "Audio file for the user turn (anything soundfile reads: WAV, FLAC, OGG, "
                          "MP3; any rate and channel count); repeatable; with or without --prompt.")
flags.DEFINE_multi_string("image", [], "Image file for the user turn (anything Pillow reads); repeatable.")
flags.DEFINE_multi_string("video", [], "Video file for the user turn (anything PyAV/FFmpeg decodes; frames sampled at "
                          "2 fps); repeatable.")
flags.DEFINE_bool("use_audio_in_video", False, "Each --video's own audio track joins the prompt, interleaved with its "
                  "frames by time.")
flags.DEFINE_string("system", None, "Optional system message.")
flags.DEFINE_bool("interactive", False, "Chat on stdin, keeping the history; '/reset' clears it, '/exit' or EOF quits "
                  "(turn n samples with --seed + n - 1).")
flags.DEFINE_bool("text_only", False, "Generate text only (skip the talker and vocoder).")
flags.DEFINE_string("output", "output.wav", "WAV file for the speech (24 kHz); empty: do not write one. "
                    "With --interactive, turn_<n>.wav files go into this file's directory.")
flags.DEFINE_string("dump_dir", None, "If set, write tokens.json (+ codes.npy and audio.wav with speech) there.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.DEFINE_bool("stream", False, "Stream: print text as it comes and write audio chunk by chunk while the thinker "
                  "is still writing (--output file.wav stays valid after every chunk; --output=- writes raw PCM "
                  "s16le 24 kHz mono to stdout and the text to stderr); prints latencies. Batch 1, one process.")
shared.define_stream_flags()


def _prompt_given() -> list[str]:
    return [f for f in ("prompt", "prompt_file", "input_ids") if getattr(FLAGS, f) is not None]


def _media_given() -> list[str]:
    return [f for f in ("audio", "image", "video") if getattr(FLAGS, f)]


def _check_flags() -> None:
    """Flag checks that need neither jax nor the model: they fail in well under a second."""
    given, media = _prompt_given(), _media_given()
    if FLAGS.interactive:
        if given or media:
            raise UsageError(f"--interactive reads the prompts (and /audio, /image, /video PATH lines) from stdin; "
                             f"drop --{', --'.join(given + media)}")
    elif media and FLAGS.input_ids is not None:
        raise UsageError(f"--input_ids are exact ids without media; use --prompt or --prompt_file with "
                         f"--{', --'.join(media)}")
    elif len(given) > 1 or (not given and not media):
        raise UsageError(f"give exactly one of --prompt, --prompt_file, --input_ids, or --audio / --image / --video "
                         f"(got {given or 'none'})")
    if FLAGS.use_audio_in_video and not FLAGS.video and not FLAGS.interactive:
        raise UsageError("--use_audio_in_video needs a --video")
    if FLAGS.stream:
        bad = [f for f in ("interactive", "text_only", "dump_dir") if getattr(FLAGS, f)]
        if bad:
            raise UsageError(f"--stream runs one prompt with speech in one process; drop --{', --'.join(bad)}")
    if FLAGS.prefill_chunk is not None and FLAGS.prefill_chunk < 1:
        raise UsageError(f"--prefill_chunk must be >= 1, got {FLAGS.prefill_chunk}")
    if FLAGS.checkpoint and not os.path.isdir(FLAGS.checkpoint):
        raise UsageError(f"--checkpoint={FLAGS.checkpoint!r} is not a directory")
    # Output locations are checked now, not after minutes of generation; nothing is created here.
    if FLAGS.output and FLAGS.output != "-" and not FLAGS.text_only:
        if FLAGS.interactive:
            checks.check_output_dir(os.path.dirname(os.path.abspath(FLAGS.output)), "--output")
        else:
            checks.check_output_file(FLAGS.output, "--output")
    if FLAGS.dump_dir:
        checks.check_output_dir(FLAGS.dump_dir, "--dump_dir")


def _prompt_text() -> str | None:
    """The user message of --prompt / --prompt_file (None for --input_ids or --interactive)."""
    if FLAGS.prompt_file is not None:
        text, where = checks.read_text_file(FLAGS.prompt_file, "--prompt_file"), f"--prompt_file={FLAGS.prompt_file!r}"
    elif FLAGS.prompt is not None:
        text, where = FLAGS.prompt, "--prompt"
    else:
        return None
    if not text.strip():
        raise UsageError(f"{where} is empty; give the text to answer")
    return text


def _user_message(text: str | None, audio: list, images: list = (), videos: list = ()) -> dict:
    """The user turn: plain text, or the images, videos and audio clips then the text as content parts."""
    parts = ([{"type": "image", "image": p} for p in images] + [{"type": "video", "video": p} for p in videos]
             + [{"type": "audio", "audio": a} for a in audio])
    if not parts:
        return {"role": "user", "content": text}
    return {"role": "user", "content": parts + ([{"type": "text", "text": text}] if text else [])}


def _prompt(tokenizer, config, text: str | None):
    """prompt_lib.PromptInputs (ids, audio features, images / videos); every --audio, --image and --video file is
    read and checked here, before the weights load."""
    from omni_jax.processing.vision import processor_for_model
    from omni_jax.runtime import prompt as prompt_lib

    if FLAGS.input_ids is not None:
        return prompt_lib.PromptInputs(_prompt_ids(config.thinker.text.vocab_size), [], [])
    processor = processor_for_model(FLAGS.checkpoint, config.thinker.vision) if config.thinker.vision else None
    message = _user_message(text, FLAGS.audio, FLAGS.image, FLAGS.video)
    return prompt_lib.encode_messages(tokenizer, config, _system_messages() + [message], processor=processor,
                                      use_audio_in_video=FLAGS.use_audio_in_video)


def _prompt_ids(vocab_size: int) -> list[int]:
    """The --input_ids, checked."""
    try:
        ids = [int(t) for t in FLAGS.input_ids.split(",") if t.strip()]
    except ValueError as e:
        raise UsageError(f"--input_ids must be comma-separated integers: {e}") from None
    if not ids:
        raise UsageError("--input_ids is empty; give at least one token id")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise UsageError(f"--input_ids has ids outside [0, {vocab_size}): {bad[:5]}")
    return ids


def _system_messages() -> list[dict]:
    return [{"role": "system", "content": FLAGS.system}] if FLAGS.system else []


def main(argv):
    del argv
    _run()


def _run():
    _check_flags()  # before jax is imported
    text = _prompt_text()

    from omni_jax.config import load_config
    from omni_jax.processing.tokenizer import load_tokenizer
    from omni_jax.runtime.loading import DEFAULT_CONFIG
    from omni_jax.runtime.pipeline import OmniPipeline
    from omni_jax.sharding.mesh import is_primary, maybe_initialize_distributed

    multi = maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if multi and (FLAGS.interactive or FLAGS.stream):
        raise UsageError(f"--{'interactive' if FLAGS.interactive else 'stream'} runs in a single process")
    # Everything the flags and the config can tell is checked before the weights load.
    samplings = shared.samplings()
    dtype = shared.parse_dtype_flag(FLAGS.dtype)
    config = load_config(FLAGS.checkpoint or DEFAULT_CONFIG)
    if not FLAGS.text_only:
        checks.check_speech(config, FLAGS.checkpoint)
        config.talker.speaker(FLAGS.speaker)  # unknown speaker -> UsageError listing the known ones
    mesh = shared.make_mesh_flag(FLAGS.mesh, config)
    prompt, audio, visual, front_end_s = None, [], [], 0.0
    if not FLAGS.interactive:
        t0 = time.perf_counter()
        prompt, audio, visual = _prompt(load_tokenizer(FLAGS.checkpoint), config, text)
        front_end_s = time.perf_counter() - t0  # template + reading and featurizing the audio, images and videos
        from omni_jax.runtime import prompt as prompt_lib

        prompt_lib.check_fits(config, len(prompt), audio, FLAGS.max_new_tokens, FLAGS.max_len, visual=visual)
    pipe = OmniPipeline.load(FLAGS.checkpoint, dtype=dtype, max_len=FLAGS.max_len, mesh=mesh,
                             prefill_chunk=FLAGS.prefill_chunk)
    if FLAGS.stream:
        return _stream(pipe, samplings, prompt, audio, front_end_s, visual)
    primary = is_primary()  # every process computes; only process 0 prints and writes
    say = print if primary else (lambda *a, **k: None)
    if pipe.random_weights:
        say(f"NOTE: no --checkpoint given, so the weights are RANDOM ({pipe.loaded.source}); "
            "the generated text and speech are meaningless.", flush=True)
    if FLAGS.interactive:
        _chat(pipe, samplings, say, primary)
        return
    res = _answer(pipe, prompt, samplings, FLAGS.seed, audio, visual)
    if primary:
        _report(pipe, res, FLAGS.output or None, FLAGS.dump_dir)


def _answer(pipe, prompt: list[int], samplings, seed: int, audio=(), visual=()):
    text, talker = samplings
    (res,) = pipe.generate_ids(
        [prompt], FLAGS.speaker, text_only=FLAGS.text_only, max_new_tokens=FLAGS.max_new_tokens,
        talker_max_new_tokens=FLAGS.talker_max_new_tokens, sampling=text, talker_sampling=talker, seed=seed,
        audio=[list(audio)], visual=[list(visual)],
    )
    return res


def _report(pipe, res, wav_path: str | None, dump_dir: str | None, label: str = "", extra: dict | None = None):
    """Print the reply (+ a summary line) and write the WAV / dump files."""
    import numpy as np

    print(f"[{label}{len(res.prompt_ids)} prompt tokens, {len(res.token_ids)} generated, "
          f"finish: {res.finish_reason}]")
    if res.reasoning is not None:
        print(f"[reasoning]\n{res.reasoning}\n[answer]")
    print(res.text, flush=True)
    if res.wav is not None:
        print(f"[speech: {res.codes.shape[1]} frames, {res.audio_seconds:.2f} s at {res.sample_rate} Hz, "
              f"speaker {FLAGS.speaker}]")
        if wav_path:
            _write_wav(wav_path, res)
            print(f"wrote {wav_path}")
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
        doc = {"prompt_ids": res.prompt_ids, "generated_ids": res.token_ids, "text": res.text,
               **({"reasoning": res.reasoning} if res.reasoning is not None else {}),
               "finish_reason": res.finish_reason, "weights": pipe.loaded.source, **(extra or {})}
        if res.codes is not None:
            doc.update(speaker=FLAGS.speaker, frames=int(res.codes.shape[1]), sample_rate=res.sample_rate)
            np.save(os.path.join(dump_dir, "codes.npy"), np.asarray(res.codes, np.int32))
            _write_wav(os.path.join(dump_dir, "audio.wav"), res)
        if res.prompt_logits is not None:
            np.save(os.path.join(dump_dir, "prompt_logits.npy"), np.asarray(res.prompt_logits, np.float32))
        if res.audio_embeds is not None:
            np.save(os.path.join(dump_dir, "audio_embeds.npy"), np.asarray(res.audio_embeds, np.float32))
        if res.vision_embeds is not None:
            np.save(os.path.join(dump_dir, "vision_embeds.npy"), np.asarray(res.vision_embeds, np.float32))
        n = len(res.prompt_ids)  # a prompt without images or videos has text positions: t = h = w running
        positions = res.position_ids if res.position_ids is not None else np.broadcast_to(np.arange(n), (3, n))
        np.save(os.path.join(dump_dir, "position_ids.npy"), np.asarray(positions, np.float32))
        with open(os.path.join(dump_dir, "tokens.json"), "w", encoding="utf-8") as f:
            json.dump(doc, f, ensure_ascii=False)
        print(f"wrote {dump_dir}")


def _write_wav(path: str, res) -> None:
    import soundfile as sf

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sf.write(path, res.wav, res.sample_rate, subtype="PCM_16")


def _chat(pipe, samplings, say, primary: bool) -> None:
    """Read user turns from stdin; each reply joins the history the next prompt is built from."""
    from omni_jax.runtime.types import Request

    history = _system_messages()
    wav_dir = os.path.dirname(os.path.abspath(FLAGS.output)) if FLAGS.output else None
    say("interactive chat: type a message and press Enter; /reset clears the history, /exit or EOF quits", flush=True)
    turn = 0
    while True:
        say("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            say()
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history = _system_messages()
            say("[history cleared]", flush=True)
            continue
        content = text
        for kind in ("audio", "image", "video"):
            if text == f"/{kind}" or text.startswith(f"/{kind} "):
                content = [{"type": kind, kind: text[len(kind) + 1:].strip()}]
        messages = history + [{"role": "user", "content": content}]
        try:
            # The whole history is re-rendered, earlier files included (they are read again).
            prompt, audio, visual = pipe.prepare(Request(messages=messages,
                                                         use_audio_in_video=FLAGS.use_audio_in_video))
            res = _answer(pipe, prompt, samplings, FLAGS.seed + turn, audio, visual)
        except ValueError as e:  # a bad file, or the history outgrew --max_len: report, keep the session
            say(f"error: {e} (turn not added; /reset clears the history)", flush=True)
            continue
        turn += 1
        history = messages + [{"role": "assistant", "content": res.text}]
        if primary:
            wav = os.path.join(wav_dir, f"turn_{turn}.wav") if wav_dir else None
            dump = os.path.join(FLAGS.dump_dir, f"turn_{turn}") if FLAGS.dump_dir else None
            _report(pipe, res, wav, dump, label=f"turn {turn}: ", extra={"messages": messages})


def _stream(pipe, samplings, prompt: list[int], audio, front_end_s: float, visual=()) -> None:
    """--stream: text deltas and progressive audio (omni_jax.cli.output; latencies printed at the end)."""
    from omni_jax.cli.output import stream_to_outputs

    log = sys.stderr if FLAGS.output == "-" else sys.stdout  # stdout may carry the raw audio
    if pipe.random_weights:
        print(f"NOTE: no --checkpoint given, so the weights are RANDOM ({pipe.loaded.source}); "
              "the generated text and speech are meaningless.", file=log, flush=True)
    text, talker = samplings
    stream = pipe.stream(prompt, speaker=FLAGS.speaker, max_new_tokens=FLAGS.max_new_tokens,
                         talker_max_new_tokens=FLAGS.talker_max_new_tokens, sampling=text, talker_sampling=talker,
                         seed=FLAGS.seed, chunk_frames=FLAGS.stream_chunk,
                         first_chunk_frames=FLAGS.stream_first_chunk, audio=list(audio), visual=list(visual))
    stream.front_end_s = front_end_s  # the features were made before the weights loaded
    stream_to_outputs(stream, FLAGS.output or None, pipe.sample_rate, text_out=log)
    if FLAGS.output and FLAGS.output != "-":
        print(f"wrote {FLAGS.output}", file=log)


if __name__ == "__main__":
    cli.run(main)
