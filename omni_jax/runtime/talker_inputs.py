"""The talker's prompt, exactly as HF `generate` assembles it (_get_talker_user_parts /
_get_talker_assistant_parts), from plain per-row arrays of the thinker's output.

User turns become text_projection(token embedding), or hidden_projection(accept-layer hidden state)
at audio/image/video placeholders; the assistant header gets the codec specials (speaker id,
think markers); the reply's later tokens become the trailing text one talker step adds each.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax import buckets
from omni_jax.config import OmniConfig
from omni_jax.errors import UsageError
from omni_jax.models.talker import Talker
from omni_jax.processing.positions import mrope_positions


class TalkerInputs(NamedTuple):
    embeds: jax.Array  # [B, T, H] talker prompt embeddings, right-padded with zeros
    lengths: np.ndarray  # [B] int32 real prompt length per row
    trailing: jax.Array  # [B, Ttr, H] text hidden added at decode step s (column s); ends with >= 1 tts_pad column
    tts_pad: jax.Array  # [H] text_projection(tts_pad) (what every step past Ttr adds)
    input_ids: np.ndarray  # [B, T] HF `talker_input_ids` (user ids, then tts_pad x 9), right-padded with 0


def tts_token_ids(config: OmniConfig) -> tuple[int, int, int]:
    """Thinker ids whose embeddings `build_talker_inputs` needs, in order (tts_bos, tts_eos, tts_pad)."""
    return (config.tts_bos_token_id, config.tts_eos_token_id, config.tts_pad_token_id)


def _user_positions(ids: np.ndarray, config: OmniConfig) -> np.ndarray:
    """Prompt positions whose turn (token after the latest <|im_start|> at or before it) is `user`."""
    n = ids.shape[0]
    pos = np.arange(n)
    prev = np.maximum.accumulate(np.where(ids == config.im_start_token_id, pos, -1))
    role = ids[np.minimum(np.maximum(prev, 0) + 1, n - 1)]
    return pos[role == config.user_token_id]


def _assistant_start(ids: np.ndarray, config: OmniConfig, row: int) -> int:
    hits = np.nonzero((ids[:-1] == config.im_start_token_id) & (ids[1:] == config.assistant_token_id))[0]
    if hits.size == 0:
        raise UsageError(f"row {row}: prompt has no '<|im_start|>assistant' header; the talker needs one "
                         "(apply the chat template with add_generation_prompt=True, or use text_only)")
    return int(hits[-1])


def build_talker_inputs(
    config: OmniConfig,
    params,
    prompt_ids: Sequence[np.ndarray],
    generated_ids: Sequence[np.ndarray],
    thinker_embeds: Sequence[np.ndarray],
    accept_hidden: Sequence[np.ndarray] | None,
    tts_embeds: np.ndarray,
    speaker: str | Sequence[str],
    thinker_eos_ids: Sequence[int] | None = "default",
    dtype=jnp.float32,
    project_fn=None,
) -> TalkerInputs:
    """Talker prompt + trailing text hidden states, as HF `generate` builds them, per row.

    params: the "talker" param subtree. Per row b (unpadded): prompt_ids[b] [Lp], generated_ids[b]
    [G] (thinker output, may include EOS and anything after it), thinker_embeds[b] [Lp+G-1 or Lp+G,
    Hth] the thinker's input token embeddings, accept_hidden[b] [>=Lp, Hth] output of layer
    `accept_hidden_layer` (only read at audio/image/video positions; may be None for text-only).
    tts_embeds [3, Hth]: thinker embeddings of `tts_token_ids(config)`. speaker: name or one per row.
    thinker_eos_ids: ids ending a row's text (default: <|im_end|>, HF's default); the trailing text
    gets tts_eos right after the first one and tts_pad beyond. None disables that move, as in HF.

    As in HF, only the first Lp+G-1 embeddings are used (the last generated token is never fed to the
    thinker). HF batches pad every row's generated ids to a common G, which makes a row that ended
    early keep its EOS token's embedding in the trailing text; pass padded rows to reproduce that,
    or rows cut after their EOS to reproduce HF's single-sequence result.
    """
    b = len(prompt_ids)
    if not (len(generated_ids) == len(thinker_embeds) == b) or (accept_hidden is not None and len(accept_hidden) != b):
        raise ValueError("prompt_ids, generated_ids, thinker_embeds (and accept_hidden) need one entry per row")
    if b == 0:
        raise ValueError("build_talker_inputs needs at least one row")
    if thinker_eos_ids == "default":
        thinker_eos_ids = (config.im_end_token_id,)
    speakers = [speaker] * b if isinstance(speaker, str) else list(speaker)
    if len(speakers) != b:
        raise ValueError(f"got {len(speakers)} speakers for {b} rows")
    speaker_ids = [config.talker.speaker(s) for s in speakers]
    tk = config.talker
    hth = tk.thinker_hidden_size
    mm_ids = np.array([config.thinker.audio_token_id, config.thinker.image_token_id, config.thinker.video_token_id])

    # Gather every token that needs projecting into one flat batch (one compiled call).
    flat_e, flat_h, flat_mm, rows = [], [], [], []
    for r in range(b):
        ids_p = np.asarray(prompt_ids[r]).astype(np.int64).reshape(-1)
        gen = np.asarray(generated_ids[r]).astype(np.int64).reshape(-1)
        emb = np.asarray(thinker_embeds[r], np.float32)
        lp, g = ids_p.shape[0], gen.shape[0]
        fed = lp + g - 1  # tokens the thinker consumed
        if emb.ndim != 2 or emb.shape[0] not in (fed, fed + 1) or emb.shape[1] != hth:
            raise ValueError(f"row {r}: thinker_embeds shape {emb.shape} must be ({fed} or {fed + 1}, {hth}) "
                             f"for {lp} prompt + {g} generated tokens")
        emb = emb[:fed]
        if lp < 2:
            raise ValueError(f"row {r}: prompt has {lp} tokens; it needs at least '<|im_start|>assistant'")
        users = _user_positions(ids_p, config)
        a = _assistant_start(ids_p, config, r)
        if fed - a < 4:
            raise ValueError(f"row {r}: need the 3-token assistant header and 2 generated tokens after it "
                             f"(HF takes the first one into the prompt and the rest as trailing text)")
        mm = np.isin(ids_p[users], mm_ids)
        if mm.any():
            if accept_hidden is None:
                raise ValueError(f"row {r}: prompt has multimodal tokens, so accept_hidden is required")
            hid = np.asarray(accept_hidden[r], np.float32)
            if hid.ndim != 2 or hid.shape[0] < lp or hid.shape[1] != hth:
                raise ValueError(f"row {r}: accept_hidden shape {hid.shape} must be (>= {lp}, {hth})")
            user_hidden = hid[users]
        else:
            user_hidden = np.zeros((users.shape[0], hth), np.float32)
        flat_e += [emb[users], emb[a:]]
        flat_h += [user_hidden, np.zeros((fed - a, hth), np.float32)]
        flat_mm += [mm, np.zeros((fed - a,), bool)]
        rows.append((gen, ids_p[users], fed - a))
    specials = np.asarray(tts_embeds, np.float32)
    if specials.shape != (3, hth):
        raise ValueError(f"tts_embeds shape {specials.shape} != (3, {hth}) (tts_bos, tts_eos, tts_pad)")
    flat_e.append(specials)
    flat_h.append(np.zeros_like(specials))
    flat_mm.append(np.zeros((3,), bool))

    e, h, mm = np.concatenate(flat_e), np.concatenate(flat_h), np.concatenate(flat_mm)
    n = e.shape[0]
    pad = buckets.bucket(n, 64) - n
    proj = (project_fn or compiled_projection(config, jnp.dtype(dtype)))(
        params, jnp.asarray(np.pad(e, ((0, pad), (0, 0))), dtype), jnp.asarray(np.pad(h, ((0, pad), (0, 0))), dtype),
        jnp.asarray(np.pad(mm, (0, pad))),
    )
    proj = np.asarray(proj.astype(jnp.float32))[:n]
    tts_bos, tts_eos, tts_pad = proj[n - 3], proj[n - 2], proj[n - 1]

    codec_table = params["model"]["codec_embedding"]["embedding"]
    eos_set = np.asarray(list(thinker_eos_ids) if thinker_eos_ids is not None else [], np.int64)
    seqs, trails, tids = [], [], []
    off = 0
    for r, (gen, user_ids, na) in enumerate(rows):
        nu = user_ids.shape[0]
        user_part, ah = proj[off:off + nu], proj[off + nu:off + nu + na]
        off += nu + na
        text = np.concatenate([ah[:3], np.repeat(tts_pad[None], 4, 0), tts_bos[None], ah[3:4]])
        special = np.array([tk.codec_nothink_id, tk.codec_think_bos_id, tk.codec_think_eos_id, speaker_ids[r],
                            tk.codec_pad_id, tk.codec_bos_id])
        codec = np.concatenate([np.zeros((3, text.shape[1]), np.float32),
                                np.asarray(jnp.take(codec_table, jnp.asarray(special), axis=0), np.float32)])
        seqs.append(np.concatenate([user_part, text + codec]))
        trailing = np.concatenate([ah[4:], tts_eos[None]])
        if eos_set.size:
            hits = np.nonzero(np.isin(gen, eos_set))[0]
            first = int(hits[0]) if hits.size else gen.shape[0]
            j = np.arange(trailing.shape[0])
            trailing = np.where((j > first)[:, None], tts_pad, trailing)
            trailing = np.where((j == first)[:, None], tts_eos, trailing)
        trails.append(trailing)
        tids.append(np.concatenate([user_ids, np.full((9,), config.tts_pad_token_id, np.int64)]))

    lengths = np.array([s.shape[0] for s in seqs], np.int32)
    t = int(lengths.max())
    ttr = max(x.shape[0] for x in trails) + 1
    embeds = np.zeros((b, t, proj.shape[1]), np.float32)
    trailing = np.broadcast_to(tts_pad, (b, ttr, proj.shape[1])).copy()
    input_ids = np.zeros((b, t), np.int64)
    for r in range(b):
        embeds[r, :lengths[r]] = seqs[r]
        trailing[r, :trails[r].shape[0]] = trails[r]
        input_ids[r, :lengths[r]] = tids[r]
    return TalkerInputs(
        jnp.asarray(embeds, dtype), lengths, jnp.asarray(trailing, dtype), jnp.asarray(tts_pad, dtype), input_ids
    )




def _project(model: Talker, params, embeds, hidden, mm):
    return model.apply({"params": params}, embeds, hidden, mm, method=Talker.project)


@functools.lru_cache(maxsize=None)
def compiled_projection(config: OmniConfig, dtype):
    """Compiled `Talker.project` (params, embeds [N, H], hidden [N, H], mm [N]) -> [N, H_talker]."""
    return jax.jit(functools.partial(_project, Talker(config, dtype, dtype)))


def talker_positions(config: OmniConfig, prompt_ids: Sequence[Sequence[int]], inputs: TalkerInputs,
                     visual: Sequence[Sequence[Any]], audio_rows: Sequence[Sequence[int]] = ()
                     ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(positions [3, B, T] float, deltas [B]) of talker prompts whose user turns hold images or videos, as
    transformers' talker computes them (get_rope_index over its input ids: the user turns, then the assistant
    part); (None, None) when no row has any, as the text positions then apply. visual: per row, the prompt's
    items in order (omni_jax.processing.vision.VisualInput); those outside user turns are not in the talker's
    prompt. audio_rows: per row, its clips' encoder rows (their spans' lengths)."""
    if not any(len(v) for v in visual) or config.thinker.vision is None:
        return None, None
    # transformers' talker reads its own config's time scale (the released checkpoint repeats the thinker's 13)
    th = dataclasses.replace(config.thinker, position_id_per_seconds=config.talker.position_id_per_seconds)
    m = th.vision.spatial_merge_size
    b, t = inputs.input_ids.shape
    positions = np.broadcast_to(np.arange(t, dtype=np.float64), (3, b, t)).copy()
    deltas = np.zeros((b,), np.float64)
    for r in range(b):
        ids = np.asarray(prompt_ids[r], np.int64)
        users = set(_user_positions(ids, config).tolist())
        keep = []
        for kind, pad in (("image", th.image_token_id), ("video", th.video_token_id)):
            starts = np.flatnonzero(ids == pad)
            at = 0
            for v in visual[r]:
                if v.kind == kind:
                    keep.append((int(starts[at]), v))
                    at += v.tokens(m)
        items = [v for start, v in sorted(keep, key=lambda x: x[0]) if start in users]
        if not items:
            continue
        n = int(inputs.lengths[r])
        pos, delta = mrope_positions(
            inputs.input_ids[r, :n], th, [v.grid for v in items if v.kind == "image"],
            [v.grid for v in items if v.kind == "video"], [v.seconds_per_grid for v in items if v.kind == "video"],
            list(audio_rows[r]) if len(audio_rows) else (), any(v.audio is not None for v in items))
        positions[:, r, :n] = pos
        positions[:, r, n:] = pos[:, -1:] + 1 + np.arange(t - n)
        deltas[r] = delta
    return positions.astype(np.float32), deltas.astype(np.float32)
