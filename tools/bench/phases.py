"""The benchmark phases, each timed side by side with transformers on the same weights (see DEFINITIONS)."""

from __future__ import annotations

import contextlib
import time

from omni_jax.runtime.types import STREAM_STAGES
from tools.bench.harness import Ctx, div, measure, med, median, run_pair, run_rounds
from tools.bench.roofline import (RouterLog, union_list, decoder_step_params, prefill_flops,
                                  talker_frame_params)

DEFINITIONS = {
    "ratio": "ours throughput / theirs throughput (for times and RTFs: theirs / ours); > 1 means omni_jax is faster",
    "prefill": "batch 1, prompt_len random ids; ours: ThinkerEngine.start (jitted prefill, last position's logits "
               "+ first token); theirs: thinker.model forward (use_cache=True) + lm_head on the last position "
               "(transformers' thinker has no logits_to_keep). tokens/s = prompt_len / median time",
    "decode": "greedy, EOS disabled, decode_prompt_len random ids per row; rate = N / (median t(N+1 new tokens) - "
              "median t(1 new token)); ours ThinkerEngine.generate, theirs thinker.generate(do_sample=False, "
              "min_new_tokens=max_new_tokens). tokens/s summed over rows and per row",
    "talker": "same prompt and greedy thinker for both; only the talker stage is timed (ours "
              "TalkerGenerator.generate, theirs the talker.generate call inside generate(return_audio=True), "
              "min_new_tokens set so codec EOS is suppressed there); frames/s = frames / time, 1 frame = 80 ms",
    "code2wav": "code2wav_seconds of random valid codes, batch 1; ours OmniPipeline.vocode, theirs "
                "code2wav.chunked_decode(chunk 300, left context 25); RTF = compute s / audio s",
    "e2e": "text prompt -> speech, greedy thinker (e2e_tokens) and talker (<= e2e_frames); theirs generate("
           "return_audio=True) (not streaming: first audio = total); ours OmniPipeline.stream (first audio chunk, "
           "total) and OmniPipeline.generate_ids (non-streaming total); RTF = total s / audio s; "
           "stream_over_generate = streamed total / non-streaming total; ours_stream.breakdown = the stream's "
           "time-to-first-audio marks (medians): thinker first token, talker prefill, first frame (code "
           "predictor), first vocoder chunk; ours_spoken_stream: the same for a spoken question (e2e_audio_seconds "
           "of synthetic 16 kHz audio + the text prompt), front end (template + log-mel) and audio encoder included",
    "vocoder_stream": "ours: VocoderStream (stateful Code2Wav), batch 1, random codes; per chunk size in "
                      "vocoder_chunks: median seconds of one decode call (vocoder_calls calls after a warm-up) and "
                      "RTF = that / chunk audio s; theirs: transformers code2wav forward on 25 frames of left context "
                      "+ the chunk (the per-chunk work of its chunked_decode). Long reply: vocoder_long_chunks chunks "
                      "of stream_chunk frames in one stream, streamed `repeats` times; per-chunk time of chunk 5 and "
                      "chunk 200 (median over the repeats, then over chunks k-2..k+2) and their ratio; streamed "
                      "total / non-streamed OmniPipeline.vocode of the same frames",
    "bandwidth": "median copy rate of a copy_mib float32 array counting read + write bytes: numpy np.copyto and a "
                 "jitted jax scale (donated off-CPU); the roofline uses the larger; 'read_only' is a jitted jax sum",
    "matmul": "median rate of an n x n float32 jax matmul (2 n^3 FLOPs); torch for reference",
    "audio_encoder": "audio_seconds of random log-mel features, batch 1, the real encoder width (--audio_config); "
                     "ours AudioEncoderSteps.encode, theirs Qwen3OmniMoeAudioEncoder forward on the same weights; "
                     "ratio = theirs s / ours s; roofline = matmul FLOPs (convs, layers, windowed attention) / "
                     "matmul FLOP/s",
    "vision_encoder": "the real vision encoder width (--audio_config's vision_config: 27 blocks x 1152), random weights, "
                      "batch 1: one vision_image_size image (resized by our processor: smart_resize, the released "
                      "pixel bounds) and one vision_video_seconds video at 2 fps (frames at the video pixel bounds); "
                      "ours VisionEncoderSteps.encode, theirs Qwen3OmniMoeVisionEncoder forward on the same patches "
                      "and weights; ratio = theirs s / ours s; roofline = matmul FLOPs (patch embed, blocks, per-frame "
                      "attention, mergers) / matmul FLOP/s",
    "decode_bytes": "weights one step reads: embedding rows + per layer (q/k/v/o + norms + router + the experts "
                    "routed at that step, union over the batch rows) + final norm + head; routed counts from "
                    "transformers' routers (hooks) on the actual generated sequences, else top-k exact at batch 1 "
                    "and the uniform-routing expectation E(1-(1-k/E)^B) otherwise",
    "talker_bytes": "per frame: talker step (attention + router + routed top-k + shared expert + codec head) + "
                    "code predictor 15 steps x (all layers + final norm) + 15 group heads + 15 embedding rows",
    "roofline_pct": "decode-like: measured steps/s / (bandwidth / bytes per step); prefill and Code2Wav: "
                    "(FLOPs / s) / matmul FLOP/s. Prefill FLOPs = 2 x active params per token x tokens + causal "
                    "attention scores/values + last-position head; Code2Wav FLOPs = XLA cost_analysis of our call",
}


def phase_prefill(ctx: Ctx) -> dict:
    """Thinker prefill tokens/s: batch 1, --prompt_len random in-vocab ids."""
    import jax
    import numpy as np

    from omni_jax.runtime.sampling import SamplingParams

    t = ctx.cfg.thinker.text
    n = ctx.prompt_len
    ids = np.random.default_rng(ctx.seed).integers(0, min(t.vocab_size, 150000), n).tolist()
    engine = ctx.pipe.engine

    def ours():
        pre = engine.start([ids], 1, SamplingParams.greedy(), eos_ids=())
        jax.block_until_ready(pre.first)
        engine.release(pre.state)

    if ctx.hf is None:
        theirs = None
    else:
        import torch

        tids = torch.tensor([ids])
        mask = torch.ones_like(tids)

        def theirs():
            with torch.inference_mode():
                out = ctx.hf.thinker.model(input_ids=tids, attention_mask=mask, use_cache=True)
                ctx.hf.thinker.lm_head(out[0][:, -1:])

    res: dict = {"prompt_len": n}
    ro, rt = run_pair(ctx, ours, theirs, res)
    res["ours_s"], res["theirs_s"] = med(ro), med(rt)
    res["ours_tokens_per_s"], res["theirs_tokens_per_s"] = div(n, res["ours_s"]), div(n, res["theirs_s"])
    res["ratio"] = div(res["ours_tokens_per_s"], res["theirs_tokens_per_s"])
    res["flops"] = prefill_flops(t, n)
    if ctx.machine:
        mm = ctx.machine["matmul_flops_per_s"]
        res["roofline_tokens_per_s"] = mm / (res["flops"] / n)
        res["ours_roofline_pct"] = 100 * div(res["flops"], res["ours_s"]) / mm
        if res["theirs_s"]:
            res["theirs_roofline_pct"] = 100 * div(res["flops"], res["theirs_s"]) / mm
    return res


def phase_decode(ctx: Ctx) -> dict:
    """Thinker decode tokens/s per batch size: N / (t(N+1 tokens) - t(1 token)), greedy, EOS disabled."""
    import numpy as np

    from omni_jax.runtime.sampling import SamplingParams

    t = ctx.cfg.thinker.text
    n = ctx.decode_tokens
    rng = np.random.default_rng(ctx.seed + 1)
    out = {"new_tokens": n, "prompt_len": ctx.decode_prompt_len}
    for batch in ctx.batch_sizes:
        prompts = rng.integers(0, min(t.vocab_size, 150000), (batch, ctx.decode_prompt_len)).tolist()

        def ours_gen(m):
            return lambda: ctx.pipe.engine.generate(prompts, m, SamplingParams.greedy(), eos_ids=())

        res: dict = {"batch": batch}
        ours_short, ours_long = ours_gen(1), ours_gen(n + 1)
        theirs_short = theirs_long = None
        if ctx.hf is not None:
            import torch

            tids = torch.tensor(prompts)
            mask = torch.ones_like(tids)

            def theirs_gen(m):
                def run():
                    with torch.inference_mode():
                        return ctx.hf.thinker.generate(input_ids=tids, attention_mask=mask, max_new_tokens=m,
                                                       min_new_tokens=m, do_sample=False, pad_token_id=0)
                return run

            theirs_short, theirs_long = theirs_gen(1), theirs_gen(n + 1)
        ro, rt = run_rounds(ctx, [ours_short, ours_long],
                            None if theirs_short is None else [theirs_short, theirs_long], res)
        for who, runs in (("ours", ro), ("theirs", rt)):
            ta, tb = (med(runs[0]), med(runs[1])) if runs else (None, None)
            res[f"{who}_t1_s"], res[f"{who}_tN1_s"] = ta, tb
            rate = n / (tb - ta) if (ta is not None and tb is not None and tb > ta) else None
            res[f"{who}_tokens_per_s"] = None if rate is None else rate * batch
            res[f"{who}_tokens_per_s_per_row"] = rate
        res["ratio"] = div(res["ours_tokens_per_s"], res["theirs_tokens_per_s"])
        measured = None
        if ctx.hf is not None:  # untimed run with router hooks: experts actually routed per decode step
            log = RouterLog(ctx.hf, "thinker.")
            try:
                theirs_long()
            finally:
                log.remove()
            measured = log.union_per_layer(batch)
        union, how = union_list(t, measured, batch)
        res["routed_experts_per_layer"], res["routed_experts_source"] = union, how
        res["bytes_per_step"] = decoder_step_params(t, union, batch) * ctx.dtype_bytes
        if ctx.machine:
            steps = ctx.machine["bandwidth_Bps"] / res["bytes_per_step"]
            res["roofline_tokens_per_s"] = steps * batch
            for who in ("ours", "theirs"):
                if res.get(f"{who}_tokens_per_s"):
                    res[f"{who}_roofline_pct"] = 100 * res[f"{who}_tokens_per_s"] / res["roofline_tokens_per_s"]
        out[f"batch{batch}"] = res
    return out


def _our_thinker_for_talker(ctx: Ctx):
    """Our greedy thinker on the chat prompt (collect_hidden) -> the talker's inputs, as OmniPipeline does."""
    import jax.numpy as jnp
    import numpy as np

    from omni_jax.runtime.sampling import SamplingParams
    from omni_jax.runtime.talker_inputs import tts_token_ids

    pipe = ctx.pipe
    out = pipe.engine.generate([ctx.prompt_ids], ctx.e2e_tokens, SamplingParams.greedy(), collect_hidden=True,
                               eos_ids=ctx.eos)
    table = pipe.params["thinker"]["embed_tokens"]["embedding"]
    tts = np.asarray(jnp.take(table, jnp.asarray(tts_token_ids(pipe.config)), axis=0), np.float32)
    n = out.total_lengths[0]
    inputs = pipe.talker.build_inputs(pipe.params["talker"], [np.asarray(ctx.prompt_ids)],
                                      [np.asarray(out.tokens[0])], [out.embeds[0, :n]], [out.accept_hidden[0, :n]],
                                      tts, ["ethan"], thinker_eos_ids=ctx.eos)
    return out.tokens[0], inputs


@contextlib.contextmanager
def _hf_talker_only(hf, box: dict):
    """Time transformers' talker.generate inside its full generate and skip its Code2Wav (instance patches)."""
    import torch

    original = hf.talker.generate

    def timed_generate(*args, **kwargs):
        t0 = time.perf_counter()
        result = original(*args, **kwargs)
        box["s"] = time.perf_counter() - t0
        box["frames"] = sum(1 for h in result.hidden_states if h[-1] is not None)
        return result

    hf.talker.generate = timed_generate
    hf.code2wav.chunked_decode = lambda codes, **kw: torch.zeros(codes.shape[0], 1, 1)
    try:
        yield
    finally:
        del hf.talker.generate, hf.code2wav.chunked_decode


def phase_talker(ctx: Ctx) -> dict:
    """Talker + code predictor frames/s on the same prompt; only the talker stage is timed."""
    import jax

    from omni_jax.runtime.sampling import TalkerSampling

    f = ctx.talker_frames
    tokens, inputs = _our_thinker_for_talker(ctx)
    res: dict = {"target_frames": f, "thinker_tokens": len(tokens)}

    def ours():
        t0 = time.perf_counter()
        talk = ctx.pipe.talker.generate(ctx.pipe.params["talker"], inputs, f + 1, TalkerSampling.greedy(),
                                        rng=jax.random.PRNGKey(1), penalty_from=None)
        return {"s": time.perf_counter() - t0, "frames": int(talk.lengths[0])}

    if ctx.hf is None:
        theirs = None
    else:
        import torch

        tids = torch.tensor([ctx.prompt_ids])

        def theirs():
            box: dict = {}
            with _hf_talker_only(ctx.hf, box), torch.inference_mode():
                seqs, _ = ctx.hf.generate(input_ids=tids, return_audio=True, speaker="Ethan",
                                          thinker_max_new_tokens=ctx.e2e_tokens, thinker_do_sample=False,
                                          thinker_eos_token_id=list(ctx.eos), talker_max_new_tokens=f + 1,
                                          talker_min_new_tokens=f + 1, talker_do_sample=False)
            box["thinker_tokens"] = seqs[0, len(ctx.prompt_ids):].tolist()
            return box

    ro, rt = run_pair(ctx, ours, theirs, res)
    for who, runs in (("ours", ro), ("theirs", rt)):
        if runs:
            res[f"{who}_s"], res[f"{who}_frames"] = med(runs), int(med(runs, "frames"))
            res[f"{who}_frames_per_s"] = median([r["frames"] / r["s"] for r in runs if r["s"] and r["frames"]])
    if rt:
        res["thinker_tokens_match"] = rt[-1]["thinker_tokens"] == list(tokens)
    res["ratio"] = div(res.get("ours_frames_per_s"), res.get("theirs_frames_per_s"))
    tk = ctx.cfg.talker.text
    union, how = union_list(tk, None, 1)
    res["routed_experts_source"] = how
    parts = talker_frame_params(ctx.cfg, union)
    res["bytes_per_frame"] = {k: v * ctx.dtype_bytes for k, v in parts.items()}
    if ctx.machine:
        res["roofline_frames_per_s"] = ctx.machine["bandwidth_Bps"] / res["bytes_per_frame"]["total"]
        for who in ("ours", "theirs"):
            if res.get(f"{who}_frames_per_s"):
                res[f"{who}_roofline_pct"] = 100 * res[f"{who}_frames_per_s"] / res["roofline_frames_per_s"]
    return res


def _code2wav_flops(ctx: Ctx, codes) -> float | None:
    """XLA's cost analysis of the Code2Wav call our vocode makes (<= 300 frames: one padded full decode)."""
    import jax
    import numpy as np

    from omni_jax import buckets
    from omni_jax.runtime import vocoder

    n = codes.shape[-1]
    if n > vocoder.CHUNK_SIZE:
        return None
    width = buckets.bucket(n, 16, cap=vocoder.CHUNK_SIZE)
    padded = np.pad(codes, ((0, 0), (0, 0), (0, width - n)))
    cfg = ctx.cfg.code2wav
    fn = jax.jit(lambda p, c: vocoder.code2wav(p, c, cfg, dtype=ctx.pipe.dtype))
    lowered = fn.lower(ctx.pipe.params["code2wav"], padded)
    cost = None
    try:
        cost = lowered.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends only analyse compiled code
        pass
    if not cost or "flops" not in (cost if isinstance(cost, dict) else cost[0]):
        cost = lowered.compile().cost_analysis()
    cost = cost if isinstance(cost, dict) else cost[0]
    return float(cost["flops"])


def phase_code2wav(ctx: Ctx) -> dict:
    """Code2Wav real-time factor on --code2wav_seconds of random valid codes (batch 1)."""
    import numpy as np

    cfg = ctx.cfg.code2wav
    frames = max(1, round(ctx.code2wav_seconds * ctx.pipe.sample_rate / cfg.total_upsample))
    codes = np.random.default_rng(ctx.seed + 2).integers(0, cfg.codebook_size, (1, cfg.num_quantizers, frames))
    codes = codes.astype(np.int32)
    res: dict = {"frames": frames, "audio_s": frames * cfg.total_upsample / ctx.pipe.sample_rate}

    def ours():
        wav = ctx.pipe.vocode(codes, [frames])[0]
        return {"samples": len(wav)}

    if ctx.hf is None:
        theirs = None
    else:
        import torch

        tcodes = torch.tensor(codes, dtype=torch.long)

        def theirs():
            with torch.inference_mode():
                wav = ctx.hf.code2wav.chunked_decode(tcodes, chunk_size=300, left_context_size=25)
            return {"samples": int(wav.shape[-1])}

    ro, rt = run_pair(ctx, ours, theirs, res)
    res["ours_s"], res["theirs_s"] = med(ro), med(rt)
    res["ours_rtf"], res["theirs_rtf"] = div(res["ours_s"], res["audio_s"]), div(res["theirs_s"], res["audio_s"])
    res["ratio"] = div(res["theirs_rtf"], res["ours_rtf"])
    res["flops"] = _code2wav_flops(ctx, codes)
    if ctx.machine and res["flops"]:
        mm = ctx.machine["matmul_flops_per_s"]
        res["roofline_rtf"] = res["flops"] / mm / res["audio_s"]
        res["ours_roofline_pct"] = 100 * res["flops"] / res["ours_s"] / mm
        if res["theirs_s"]:
            res["theirs_roofline_pct"] = 100 * res["flops"] / res["theirs_s"] / mm
    return res


def _timing_marks(stream) -> dict:
    """A finished stream's Result.timings, as measurement keys (at_<mark>) for `_breakdown`."""
    return {f"at_{k}": v for k, v in stream.result.timings.items()}


def _breakdown(runs: list[dict]) -> dict:
    """Median of each first-audio mark over runs, in stage order (None for a stage a stream did not have)."""
    return {k: med(runs, f"at_{k}") for k in STREAM_STAGES}


def phase_e2e(ctx: Ctx) -> dict:
    """Text -> speech: time to first audio and total real-time factor (greedy thinker and talker)."""
    from omni_jax.runtime.sampling import SamplingParams
    from omni_jax.runtime.sampling import TalkerSampling

    pipe = ctx.pipe
    kw = dict(max_new_tokens=ctx.e2e_tokens, talker_max_new_tokens=ctx.e2e_frames + 1,
              sampling=SamplingParams.greedy(), talker_sampling=TalkerSampling.greedy(), eos_ids=ctx.eos)

    def ours_stream():
        t0 = time.perf_counter()
        first_text = first_audio = None
        chunks, samples, last = [], 0, None
        stream = pipe.stream(list(ctx.prompt_ids), chunk_frames=ctx.stream_chunk,
                             first_chunk_frames=ctx.stream_first_chunk, **kw)
        for ev in stream:
            now = time.perf_counter() - t0
            if ev.token_ids and first_text is None:
                first_text = now
            if ev.audio is not None and len(ev.audio):
                if first_audio is None:
                    first_audio = now
                else:
                    chunks.append((now - last) / (len(ev.audio) / pipe.sample_rate))
                last = now
                samples += len(ev.audio)
        total = time.perf_counter() - t0
        return {"s": total, "time_to_first_text_s": first_text, "time_to_first_audio_s": first_audio,
                "audio_s": samples / pipe.sample_rate, "chunk_rtf_median": median(chunks),
                **_timing_marks(stream)}

    def ours_generate():
        t0 = time.perf_counter()
        r = pipe.generate_ids([ctx.prompt_ids], **kw)[0]
        return {"s": time.perf_counter() - t0, "audio_s": r.audio_seconds, "tokens": len(r.token_ids),
                "frames": int(r.codes.shape[-1]), **r.timings}

    if ctx.hf is None:
        theirs = None
    else:
        import torch

        tids = torch.tensor([ctx.prompt_ids])

        def theirs():
            t0 = time.perf_counter()
            with torch.inference_mode():
                seqs, wav = ctx.hf.generate(input_ids=tids, return_audio=True, speaker="Ethan",
                                            thinker_max_new_tokens=ctx.e2e_tokens, thinker_do_sample=False,
                                            thinker_eos_token_id=list(ctx.eos),
                                            talker_max_new_tokens=ctx.e2e_frames + 1, talker_do_sample=False)
            total = time.perf_counter() - t0
            return {"s": total, "audio_s": wav.shape[-1] / pipe.sample_rate,
                    "tokens": int(seqs.shape[-1]) - len(ctx.prompt_ids)}

    def streamed(req) -> dict:
        """One request streamed to speech: total, first audio, prompt length and the first-audio marks."""
        t0 = time.perf_counter()
        stream = pipe.stream(req, chunk_frames=ctx.stream_chunk, first_chunk_frames=ctx.stream_first_chunk, **kw)
        first_audio = None
        for ev in stream:
            if ev.audio is not None and len(ev.audio) and first_audio is None:
                first_audio = time.perf_counter() - t0
        return {"s": time.perf_counter() - t0, "time_to_first_audio_s": first_audio,
                "prompt_tokens": len(stream.prompt_ids), **_timing_marks(stream)}

    def ours_spoken():
        """A spoken question (synthetic 16 kHz audio + the text prompt) streamed to speech: the breakdown."""
        import numpy as np

        from omni_jax.runtime.types import Request

        t = np.arange(int(ctx.e2e_audio_seconds * 16000)) / 16000
        rng = np.random.default_rng(ctx.seed + 4)
        wav = (0.3 * np.sin(2 * np.pi * (200 + 100 * np.sin(2 * np.pi * 0.5 * t)) * t)
               + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)
        req = Request(messages=[{"role": "user", "content": [{"type": "audio", "audio": (wav, 16000)},
                                                             {"type": "text", "text": ctx.prompt}]}])
        return streamed(req)

    def video_request():
        """A video question: e2e_video_seconds of synthetic 64 x 48 frames at 2 fps + the text prompt."""
        import numpy as np

        from omni_jax.runtime.types import Request

        n = max(2, int(round(ctx.e2e_video_seconds * 2)))
        yy, xx = np.mgrid[0:48, 0:64]
        frames = np.stack([np.stack([(xx * 4 + 9 * k) % 256, yy * 5, (xx + yy + 7 * k) % 256], -1)
                           for k in range(n)]).astype(np.uint8)  # a gradient that drifts frame to frame
        req = Request(messages=[{"role": "user", "content": [{"type": "video", "video": (frames, 2.0)},
                                                             {"type": "text", "text": ctx.prompt}]}])
        return req

    def ours_video():
        return streamed(video_request())  # the stream's front end decodes and patches the frames

    theirs_video = None
    if ctx.hf is not None and ctx.e2e_video_seconds > 0 and "visual" in pipe.params:
        import numpy as np
        import torch

        v_ids, _, v_items = pipe.prepare(video_request())
        v_extra = dict(pixel_values_videos=torch.tensor(np.concatenate([v.patches for v in v_items])),
                       video_grid_thw=torch.tensor([list(v.grid) for v in v_items]),
                       video_second_per_grid=torch.tensor([v.seconds_per_grid for v in v_items]))

        def theirs_video():  # not streaming: its first audio is its whole generate
            t0 = time.perf_counter()
            with torch.inference_mode():
                ctx.hf.generate(input_ids=torch.tensor([v_ids]), return_audio=True, speaker="Ethan",
                                thinker_max_new_tokens=ctx.e2e_tokens, thinker_do_sample=False,
                                thinker_eos_token_id=list(ctx.eos), talker_max_new_tokens=ctx.e2e_frames + 1,
                                talker_do_sample=False, **v_extra)
            return {"s": time.perf_counter() - t0}

    res: dict = {"prompt_tokens": len(ctx.prompt_ids)}
    if ctx.e2e_video_seconds > 0 and "visual" in pipe.params:
        vo, vt = run_rounds(ctx, [ours_video], None if theirs_video is None else [theirs_video], res)
        res["ours_video_stream"] = {"video_in_s": ctx.e2e_video_seconds, "prompt_tokens": med(vo[0], "prompt_tokens"),
                                    "s": med(vo[0]), "time_to_first_audio_s": med(vo[0], "time_to_first_audio_s"),
                                    "breakdown": _breakdown(vo[0])}
        if vt:
            res["theirs_video_s"] = med(vt[0])
            res["video_first_audio_ratio"] = div(res["theirs_video_s"], res["ours_video_stream"]["time_to_first_audio_s"])
    if ctx.e2e_audio_seconds > 0 and pipe.config.thinker.audio is not None:
        spoken = run_rounds(ctx, [ours_spoken], None, res)[0][0]
        res["ours_spoken_stream"] = {"audio_in_s": ctx.e2e_audio_seconds, "prompt_tokens": med(spoken, "prompt_tokens"),
                                     "s": med(spoken), "time_to_first_audio_s": med(spoken, "time_to_first_audio_s"),
                                     "breakdown": _breakdown(spoken)}
    (so, go), rt = run_rounds(ctx, [ours_stream, ours_generate], None if theirs is None else [theirs], res)
    rt = rt[0] if rt else []
    res["ours_stream"] = {k: med(so, k) for k in ("s", "time_to_first_text_s", "time_to_first_audio_s", "audio_s",
                                                  "chunk_rtf_median")}
    # time to first audio stage by stage (the stream's own clock; the front end ran before it)
    res["ours_stream"]["breakdown"] = _breakdown(so)
    res["ours_generate"] = {k: med(go, k) for k in ("s", "audio_s", "tokens", "frames", "thinker_s", "talker_s",
                                                    "code2wav_s")}
    if rt:
        res["theirs"] = {k: med(rt, k) for k in ("s", "audio_s", "tokens")}
    ours_rtf = div(res["ours_generate"]["s"], res["ours_generate"]["audio_s"])
    theirs_rtf = div(res["theirs"]["s"], res["theirs"]["audio_s"]) if rt else None
    res["ours_rtf"], res["theirs_rtf"] = ours_rtf, theirs_rtf
    res["ours_stream_rtf"] = div(res["ours_stream"]["s"], res["ours_stream"]["audio_s"])
    res["ours_time_to_first_audio_s"] = res["ours_stream"]["time_to_first_audio_s"]
    res["theirs_time_to_first_audio_s"] = res["theirs"]["s"] if rt else None
    res["ratio"] = div(theirs_rtf, ours_rtf)
    res["first_audio_ratio"] = div(res["theirs_time_to_first_audio_s"], res["ours_time_to_first_audio_s"])
    res["first_audio_over_non_streaming_total"] = div(res["ours_time_to_first_audio_s"], res["ours_generate"]["s"])
    res["stream_over_generate"] = div(res["ours_stream"]["s"], res["ours_generate"]["s"])
    return res


def _encoder_flops(cfg, frames: int) -> float:
    """Matmul FLOPs of the AuT encoder on one clip: convs, per-token layers, windowed attention, projection."""
    chunks, rest = divmod(frames, cfg.chunk_frames)
    h = cfg.downsample_hidden_size
    conv = 0.0
    for n in [cfg.chunk_frames] * chunks + ([rest] if rest else []):
        mel, t = cfg.num_mel_bins, n
        for i in range(3):
            mel, t = (mel + 1) // 2, (t + 1) // 2
            conv += 2 * 9 * (1 if i == 0 else h) * h * mel * t
    from omni_jax.models.audio_encoder import rows_for_frames

    rows = rows_for_frames(frames, cfg.chunk_frames)
    d, f = cfg.d_model, cfg.encoder_ffn_dim
    window = cfg.chunks_per_window * 13
    per_token = cfg.encoder_layers * (2 * 4 * d * d + 2 * 2 * d * f + 2 * 2 * window * d)
    proj = 2 * (h * ((cfg.num_mel_bins + 7) // 8) * d + d * d + d * cfg.output_dim)
    return conv + rows * (per_token + proj)


def phase_audio_encoder(ctx: Ctx) -> dict:
    """The AuT audio encoder at the config's own audio width (the real one: 32 layers x 1280) on --audio_seconds of
    random log-mel features, batch 1: ours AudioEncoderSteps.encode, theirs Qwen3OmniMoeAudioEncoder forward, the
    same random weights (transformers' module perturbed, converted with our rules)."""
    import numpy as np

    from omni_jax.checkpoint.convert import convert_tensors
    from omni_jax.models import audio_encoder as ae
    from omni_jax.runtime.audio_encoder import AudioEncoderSteps

    cfg = ctx.audio_cfg
    frames = int(ctx.audio_seconds * 100)
    feats = [np.random.default_rng(ctx.seed).standard_normal((cfg.num_mel_bins, frames)).astype(np.float32)]
    import torch
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeAudioEncoderConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeAudioEncoder

    torch.manual_seed(ctx.seed)
    hf = Qwen3OmniMoeAudioEncoder(Qwen3OmniMoeAudioEncoderConfig(**ctx.audio_hf_dict)).float().eval()
    steps = AudioEncoderSteps(cfg, ctx.pipe.dtype)
    import jax

    module = ae.AudioEncoder(cfg, steps.dtype, steps.dtype)
    per = cfg.chunks_per_window
    abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), np.zeros((1, per, cfg.num_mel_bins,
                                                                                   cfg.chunk_frames), np.float32),
                                                  np.ones((1, per), np.int32), np.ones((1, per), np.int32)))
    tensors = ((f"thinker.audio_tower.{k}", v.numpy()) for k, v in hf.state_dict().items()
               if "positional_embedding" not in k)
    import flax.linen as nn

    params = convert_tensors(tensors, {"audio_tower": nn.unbox(abstract["params"])}, ae.hf_rules(None))["audio_tower"]
    params = jax.tree_util.tree_map(lambda a: jax.numpy.asarray(a, steps.dtype), params)
    if ctx.hf is None:
        del hf
        hf = None
    x, lens = torch.tensor(feats[0]), torch.tensor([frames])

    def ours():
        jax.block_until_ready(steps.encode(params, feats))

    def theirs():
        with torch.inference_mode():
            hf(input_features=x, feature_lens=lens)

    res: dict = {"audio_seconds": ctx.audio_seconds, "layers": cfg.encoder_layers, "d_model": cfg.d_model,
                 "rows": ae.rows_for_frames(frames, cfg.chunk_frames)}
    ro, rt = run_pair(ctx, ours, None if hf is None else theirs, res)
    res["ours_s"], res["theirs_s"] = med(ro), med(rt)
    res["ratio"] = div(res["theirs_s"], res["ours_s"])
    res["flops"] = _encoder_flops(cfg, frames)
    if ctx.machine and res["ours_s"]:
        res["ours_roofline_pct"] = 100 * res["flops"] / res["ours_s"] / ctx.machine["matmul_flops_per_s"]
        res["roofline_s"] = res["flops"] / ctx.machine["matmul_flops_per_s"]
    return res


def _vision_flops(cfg, grid: tuple[int, int, int]) -> float:
    """Matmul FLOPs of the vision encoder on one item: patch embed, blocks (attention within each frame), mergers."""
    t, h, w = grid
    n, s, d = t * h * w, h * w, cfg.hidden_size
    block = 2 * n * (4 * d * d + 2 * d * cfg.intermediate_size) + 2 * 2 * t * s * s * d
    wide = d * cfg.merge_unit
    merger = 2 * (n // cfg.merge_unit) * (wide * wide + wide * cfg.out_hidden_size)
    return 2 * n * cfg.patch_dim * d + cfg.depth * block + (1 + len(cfg.deepstack_visual_indexes)) * merger


def phase_vision_encoder(ctx: Ctx) -> dict:
    """The vision encoder at the real width on one image and one video, batch 1: ours VisionEncoderSteps.encode,
    theirs Qwen3OmniMoeVisionEncoder forward, the same random weights (transformers' module, converted with our
    rules) and the same pixel patches (our processor's)."""
    import numpy as np

    from omni_jax.checkpoint.convert import convert_tensors
    from omni_jax.models import vision_encoder as ve
    from omni_jax.processing import video as video_lib
    from omni_jax.processing import vision as vision_lib
    from omni_jax.runtime.vision_encoder import VisionEncoderSteps

    cfg = ctx.vision_cfg
    proc = vision_lib.processor_for_model(None, cfg)
    rng = np.random.default_rng(ctx.seed)
    w, h = ctx.vision_image_size
    items = {"image": vision_lib.image_input(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), proc)}
    if ctx.vision_video_seconds > 0:
        n = int(round(ctx.vision_video_seconds * 2))
        items["video"] = video_lib.frames_input(rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8), 2.0, proc)
    import torch
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeVisionEncoderConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeVisionEncoder

    torch.manual_seed(ctx.seed)
    hf = Qwen3OmniMoeVisionEncoder(Qwen3OmniMoeVisionEncoderConfig(**ctx.vision_hf_dict)).float().eval()
    steps = VisionEncoderSteps(cfg, ctx.pipe.dtype)
    import flax.linen as nn
    import jax

    module, args = ve.build(_with_vision(ctx.cfg, cfg), steps.dtype)
    abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args))
    tensors = ((f"thinker.visual.{k}", v.numpy()) for k, v in hf.state_dict().items())
    params = convert_tensors(tensors, {"visual": nn.unbox(abstract["params"])}, ve.hf_rules(None))["visual"]
    params = jax.tree_util.tree_map(lambda a: jax.numpy.asarray(a, steps.dtype), params)
    if ctx.hf is None:
        del hf
        hf = None
    res: dict = {"depth": cfg.depth, "hidden_size": cfg.hidden_size}
    for kind, item in items.items():
        x, grid = torch.tensor(item.patches), torch.tensor([list(item.grid)])

        def ours(item=item):
            jax.block_until_ready(steps.encode(params, [item]))

        def theirs(x=x, grid=grid):
            with torch.inference_mode():
                hf(x, grid_thw=grid)

        r: dict = {"grid": list(item.grid), "tokens": item.tokens(cfg.spatial_merge_size)}
        ro, rt = run_pair(ctx, ours, None if hf is None else theirs, r)
        r["ours_s"], r["theirs_s"] = med(ro), med(rt)
        r["ratio"] = div(r["theirs_s"], r["ours_s"])
        r["flops"] = _vision_flops(cfg, item.grid)
        if ctx.machine and r["ours_s"]:
            r["ours_roofline_pct"] = 100 * r["flops"] / r["ours_s"] / ctx.machine["matmul_flops_per_s"]
            r["roofline_s"] = r["flops"] / ctx.machine["matmul_flops_per_s"]
        res[kind] = r
    return res


def _with_vision(config, vision):
    import dataclasses

    return dataclasses.replace(config, thinker=dataclasses.replace(config.thinker, vision=vision))


def phase_vocoder_stream(ctx: Ctx) -> dict:
    """Streaming Code2Wav: per-chunk cost by chunk size, and its independence of the audio before it."""
    import numpy as np

    from omni_jax.runtime.vocoder import VocoderStream

    cfg = ctx.cfg.code2wav
    params, dtype = ctx.pipe.params["code2wav"], ctx.pipe.dtype
    frame_s = cfg.total_upsample / ctx.pipe.sample_rate
    rng = np.random.default_rng(ctx.seed + 3)

    def codes(frames: int):
        return rng.integers(0, cfg.codebook_size, (cfg.num_quantizers, frames)).astype(np.int32)

    def stream_times(n: int, calls: int, info: dict) -> list[float]:
        """Seconds of each of `calls` decode calls of n frames in one fresh stream (compiles outside the list)."""
        with ctx.compile_timer.track(info):
            warm = VocoderStream(params, ctx.cfg, n, 1, dtype)
            warm.decode([codes(n)])
        stream, c, out = VocoderStream(params, ctx.cfg, n, 1, dtype), codes(n * calls), []
        for k in range(calls):
            t0 = time.perf_counter()
            stream.decode([c[:, k * n:(k + 1) * n]])
            out.append(time.perf_counter() - t0)
        return out

    res: dict = {"chunks": {}}
    for n in ctx.vocoder_chunks:
        row: dict = {"frames": n, "audio_s": n * frame_s}
        times = stream_times(n, ctx.vocoder_calls, row)
        row["ours_s"] = median(times)
        if ctx.hf is not None:
            import torch

            window = torch.tensor(codes(25 + n)[None], dtype=torch.long)

            def theirs():
                with torch.inference_mode():
                    ctx.hf.code2wav(window)

            theirs()
            row["theirs_s"] = median([measure(theirs)["s"] for _ in range(ctx.vocoder_calls)])
        row["ours_rtf"] = div(row["ours_s"], row["audio_s"])
        row["theirs_rtf"] = div(row.get("theirs_s"), row["audio_s"])
        row["ratio"] = div(row.get("theirs_s"), row["ours_s"])
        res["chunks"][str(n)] = row

    n, k = ctx.stream_chunk, ctx.vocoder_long_chunks
    long = {"chunk_frames": n, "chunks": k, "audio_s": n * k * frame_s, "repeats": ctx.repeats}
    runs = [stream_times(n, k, long) for _ in range(ctx.repeats)]
    times = [median([r[c] for r in runs]) for c in range(k)]  # per chunk, the median over repeated streams
    at = {c: median(times[c - 3:c + 2]) for c in (5, 200) if c + 2 <= k}  # chunk c is times[c - 1]
    long["chunk5_s"], long["chunk200_s"] = at.get(5), at.get(200)
    long["chunk200_over_chunk5"] = div(at.get(200), at.get(5))
    long["stream_total_s"] = sum(times)  # of the per-chunk medians
    full = codes(n * k)[None]
    ctx.pipe.vocode(full, [n * k])  # warm-up (compiles)
    long["vocode_s"] = measure(lambda: ctx.pipe.vocode(full, [n * k]))["s"]
    long["stream_over_vocode"] = div(long["stream_total_s"], long["vocode_s"])
    res["long"] = long
    return res


PHASE_FNS = {"prefill": phase_prefill, "decode": phase_decode, "talker": phase_talker,
             "code2wav": phase_code2wav, "e2e": phase_e2e, "audio_encoder": phase_audio_encoder,
             "vision_encoder": phase_vision_encoder,
             "vocoder_stream": phase_vocoder_stream}
