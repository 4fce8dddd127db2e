"""Command-line text generation with the Thinker.

  python launch/infer.py --prompt="你好,世界" --text_only
  python launch/infer.py --checkpoint=DIR --prompt_file=q.txt --temperature=0.7 --top_p=0.8
  python launch/infer.py --input_ids=151644,872,198 --greedy --max_new_tokens=16 --dump_dir=/tmp/out

Without --checkpoint the tiny config runs with deterministic random weights (smoke test only).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Checkpoint dir (omni_jax.checkpoint format); default: tiny random model.")
flags.DEFINE_string("prompt", None, "User message (ChatML template applied).")
flags.DEFINE_string("prompt_file", None, "File whose contents are the user message.")
flags.DEFINE_string("input_ids", None, "Comma-separated exact prompt token ids (no template).")
flags.DEFINE_string("system", None, "Optional system message.")
flags.DEFINE_bool("text_only", False, "Generate text only (speech output is not wired yet either way).")
flags.DEFINE_integer("max_new_tokens", 64, "Maximum number of generated tokens.")
flags.DEFINE_bool("greedy", False, "Greedy decoding (same as --temperature=0).")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Top-k filter; 0 = off.")
flags.DEFINE_float("top_p", 1.0, "Top-p (nucleus) filter; 1 = off.")
flags.DEFINE_float("repetition_penalty", 1.0, "HF-style repetition penalty; 1 = off.")
flags.DEFINE_integer("seed", 0, "PRNG seed for sampling.")
flags.DEFINE_string("dtype", None, "float32 | bfloat16 (default: float32 on CPU, bfloat16 otherwise).")
flags.DEFINE_integer("max_len", 1024, "KV-cache length: prompt + max_new_tokens must fit.")
flags.DEFINE_string("dump_dir", None, "If set, write tokens.json (prompt and generated ids) there.")


def _prompt_ids(tokenizer) -> list[int]:
    given = [f for f in ("prompt", "prompt_file", "input_ids") if getattr(FLAGS, f) is not None]
    if len(given) != 1:
        raise app.UsageError(f"give exactly one of --prompt, --prompt_file, --input_ids (got {given or 'none'})")
    if FLAGS.input_ids is not None:
        try:
            return [int(t) for t in FLAGS.input_ids.split(",") if t.strip()]
        except ValueError as e:
            raise app.UsageError(f"--input_ids must be comma-separated integers: {e}") from e
    if FLAGS.prompt_file is not None:
        with open(FLAGS.prompt_file, encoding="utf-8") as f:
            text = f.read()
    else:
        text = FLAGS.prompt
    messages = ([{"role": "system", "content": FLAGS.system}] if FLAGS.system else []) + [
        {"role": "user", "content": text}
    ]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def main(argv):
    del argv
    try:
        _run()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def _run():
    from omni_jax.engine import ThinkerEngine
    from omni_jax.loading import load_model, parse_dtype
    from omni_jax.sampling import SamplingParams

    model = load_model(FLAGS.checkpoint, parse_dtype(FLAGS.dtype))
    if model.random_weights:
        print(f"NOTE: no --checkpoint given, so the weights are RANDOM ({model.source}); "
              "the generated text is meaningless.", flush=True)
    if not FLAGS.text_only:
        print("NOTE: speech output is not wired yet; generating text only (as with --text_only).", flush=True)
    prompt = _prompt_ids(model.tokenizer)
    if FLAGS.greedy or FLAGS.temperature == 0.0:
        sampling = SamplingParams.greedy(repetition_penalty=FLAGS.repetition_penalty)
    else:
        sampling = SamplingParams(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p, FLAGS.repetition_penalty)
    engine = ThinkerEngine(model.config, model.params["thinker"], max_len=FLAGS.max_len,
                           eos_ids=model.tokenizer.eos_token_ids, pad_id=model.tokenizer.pad_token_id,
                           dtype=model.dtype)
    result = engine.generate([prompt], FLAGS.max_new_tokens, sampling, seed=FLAGS.seed)
    generated = result.tokens[0]
    text = model.tokenizer.decode(generated, skip_special_tokens=True)
    print(f"[{len(prompt)} prompt tokens, {len(generated)} generated, finish: {result.finish_reasons[0]}]")
    print(text)
    if FLAGS.dump_dir:
        os.makedirs(FLAGS.dump_dir, exist_ok=True)
        path = os.path.join(FLAGS.dump_dir, "tokens.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"prompt_ids": prompt, "generated_ids": generated, "text": text,
                       "finish_reason": result.finish_reasons[0], "weights": model.source}, f, ensure_ascii=False)
        print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
