"""Tests for omni_jax.tokenizer: exactness against tiktoken on the same ranks, round trips, ChatML, loaders."""

from __future__ import annotations

import json
import os
import random
import unicodedata

import pytest

from omni_jax.errors import UsageError
from omni_jax.processing.tokenizer import (
    NUM_BPE_RANKS,
    QWEN_PRETOKENIZE_PATTERN,
    QwenTokenizer,
    added_tokens,
    default_ranks_path,
    load_tiktoken_ranks,
    load_tokenizer,
)

ADDED = added_tokens()


def _random_strings(n: int, seed: int = 1234) -> list[str]:
    """Random strings drawn from pools that stress the pre-tokenizer (scripts, marks, spaces, digits)."""
    rng = random.Random(seed)
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789٠١٢٣٤٥٦٧٨٩０１２３",
        " \t\n\r\x0b\x0c\u00a0\u3000\u2009",
        "'\"!?.,;:-_()[]{}<>/\\|@#$%^&*+=~`",
        "的一是不了人我在有他这为之大来以个中上们你好世界",
        "éèêëàâäôöûüçñÉÀßøåæœ",
        "\u0301\u0308\u0327\u200d\ufe0f",  # combining marks, ZWJ, VS16
        "😀🎉👍🏽👨👩👧🏳🌈🔥",
        "αβγδΔΩЖжЯяשלוםمرحباनमस्तेこんにちはカタカナ한국어",
        "'s're've'll'd'm't",
    ]
    out = []
    for _ in range(n):
        length = rng.randint(1, 40)
        chars = []
        for _ in range(length):
            r = rng.random()
            if r < 0.85:
                chars.append(rng.choice(rng.choice(pools)))
            else:  # any scalar value outside the surrogate block
                cp = rng.randint(1, 0x10FFFF)
                while 0xD800 <= cp <= 0xDFFF:
                    cp = rng.randint(1, 0x10FFFF)
                chars.append(chr(cp))
        out.append("".join(chars))
    return out


FIXED_CORPUS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. It's, they're, we've, I'll, he'd, I'm, don't",
    "I'M SHOUTING, YOU'RE LOUD, IT'S FINE",
    "你好,世界",
    "通义千问是阿里巴巴开发的大语言模型。它可以回答问题、写代码、翻译文本。",
    "def f(x):\n    if x > 0:\n\treturn x ** 2  # tab\n    return -x\n\n\nclass A:\n        pass\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\r\n}\r\n",
    "emoji: 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🏳️‍🌈 heart ❤️ keycap 1️⃣",
    "spaces:  two   three    four         many\t\ttabs \t mixed   ",
    "newlines\n\n\n\nrun\r\n\r\nwin\n \n  \n end",
    "   leading spaces and trailing   ",
    "\n\n",
    "digits 1234567890 3.14159 1e-10 0x1F -42 ١٢٣ １２３",
    "mixed English中文日本語のテキスト한국어 Русский текст العربية हिन्दी",
    "accents: café naïve résumé Ångström crème brûlée Zürich São Paulo",
    "decomposed: cafe\u0301 nai\u0308ve",  # NFC-normalized by the tokenizer
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n",
    "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>describe<|audio_start|><|audio_pad|><|audio_end|>",
    "<think>\nreasoning\n</think>\n\n<tool_call>{\"a\": 1}</tool_call><tts_pad><tts_text_bos><tts_text_eod>",
    "text<|endoftext|>more<|fim_prefix|>x<|fim_suffix|>y<|fim_middle|>",
    "<|im_start <|im_end|x <think",  # near-misses stay plain text
    "https://example.com/path?q=1&r=2#frag user@mail.org",
    "!!!??? ... --- === *** ~~~ ```python\nprint('x')\n```",
    "\u00a0nbsp\u3000ideographic\u2009thin\u200bzwsp",
    "ﬁ ligature ① circled ＡＢＣ fullwidth",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("omni_jax_cache")


@pytest.fixture(scope="session")
def tok(cache_dir) -> QwenTokenizer:
    return load_tokenizer(cache_dir=cache_dir)


@pytest.fixture(scope="session")
def tiktoken_enc():
    tiktoken = pytest.importorskip("tiktoken")
    ranks = load_tiktoken_ranks(default_ranks_path())
    return tiktoken.Encoding(
        name="qwen_test",
        pat_str=QWEN_PRETOKENIZE_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={t["content"]: t["id"] for t in ADDED},
    )


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return FIXED_CORPUS + _random_strings(1000)


def test_added_tokens_data():
    assert len(ADDED) == 33
    assert [t["id"] for t in ADDED] == list(range(NUM_BPE_RANKS, NUM_BPE_RANKS + 33))
    by_name = {t["content"]: t for t in ADDED}
    # Ids cross-checked with the checkpoint config.
    for name, i in {"<|vision_start|>": 151652, "<|image_pad|>": 151655, "<|video_pad|>": 151656,
                    "<|audio_start|>": 151669, "<|audio_end|>": 151670, "<tts_pad>": 151671,
                    "<tts_text_bos>": 151672, "<tts_text_eod>": 151673, "<|audio_pad|>": 151675}.items():
        assert by_name[name]["id"] == i
    assert by_name["<think>"]["special"] is False and by_name["<|im_end|>"]["special"] is True


def test_properties(tok: QwenTokenizer):
    assert tok.vocab_size == 151676
    assert tok.token_to_id("<|im_start|>") == 151644
    assert tok.token_to_id("<|im_end|>") == 151645
    assert tok.eos_token_ids == (151645, 151643)
    assert tok.pad_token_id == 151643
    for t in ADDED:
        assert tok.token_to_id(t["content"]) == t["id"]
    with pytest.raises(KeyError):
        tok.token_to_id("<|no_such_token|>")


def _nfc(tok: QwenTokenizer, s: str) -> str:
    """NFC as the Rust backend applies it (its Unicode tables can lag Python's for brand-new marks)."""
    return tok.backend.normalizer.normalize_str(s)


def test_matches_tiktoken(tok: QwenTokenizer, tiktoken_enc, corpus):
    mismatches = []
    for s in corpus:
        want = tiktoken_enc.encode(_nfc(tok, s), allowed_special="all")
        got = tok.encode(s)
        if got != want:
            mismatches.append((s, got, want))
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[0]!r}"


def test_batch_matches_single(tok: QwenTokenizer):
    assert tok.encode_batch(FIXED_CORPUS) == [tok.encode(s) for s in FIXED_CORPUS]


def test_roundtrip(tok: QwenTokenizer, corpus):
    for s in corpus:
        nfc = _nfc(tok, s)
        assert tok.decode(tok.encode(s)) == nfc, repr(s)
        if s == nfc:
            assert tok.decode(tok.encode(s)) == s


def test_nfc_normalization(tok: QwenTokenizer):
    """Like the HF Qwen tokenizer, text is NFC-normalized before BPE (tiktoken does not do this)."""
    assert tok.encode("cafe\u0301") == tok.encode("café")
    assert _nfc(tok, "cafe\u0301 A\u030a") == unicodedata.normalize("NFC", "cafe\u0301 A\u030a")


def test_decode_skip_special(tok: QwenTokenizer):
    ids = tok.encode("<|im_start|>user\nhi<think>x</think><|im_end|><|endoftext|>")
    assert tok.decode(ids) == "<|im_start|>user\nhi<think>x</think><|im_end|><|endoftext|>"
    # <think> is a non-special added token, so it survives skip_special_tokens like in HF Qwen.
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi<think>x</think>"


def test_decode_accepts_arrays(tok: QwenTokenizer):
    np = pytest.importorskip("numpy")
    ids = tok.encode("hello 世界")
    assert tok.decode(np.asarray(ids, dtype=np.int32)) == "hello 世界"


def test_chat_template(tok: QwenTokenizer):
    msgs = [{"role": "user", "content": "你好,世界"}]
    text = tok.apply_chat_template_text(msgs)
    assert text == "<|im_start|>user\n你好,世界<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(msgs)
    assert ids == tok.encode(text)
    nl = 198
    assert tok.encode("\n") == [nl] and tok.encode("user") == [872] and tok.encode("assistant") == [77091]
    body = tok.encode("你好,世界")
    assert ids == [151644, 872, nl] + body + [151645, nl, 151644, 77091, nl]
    no_prompt = tok.apply_chat_template(msgs, add_generation_prompt=False)
    assert no_prompt == ids[:-3]


def test_chat_template_multi_turn(tok: QwenTokenizer):
    msgs = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": ""},
    ]
    text = tok.apply_chat_template_text(msgs, add_generation_prompt=False)
    assert text == ("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\n<|im_end|>\n")
    assert tok.apply_chat_template(msgs, add_generation_prompt=False).count(151644) == 4


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "user", "content": "ok"}, "hi"], r"message 1: expected a dict"),
        ([{"content": "x"}], r"message 0: missing 'role'"),
        ([{"role": "tool", "content": "x"}], r"message 0: invalid role 'tool'"),
        ([{"role": "user"}], r"message 0: missing 'content'"),
        ([{"role": "user", "content": ["x"]}], r"message 0: content part 0 must be a dict with a 'type', got str"),
        ([{"role": "user", "content": 3}], r"message 0: 'content' must be a str or a list of content parts, got int"),
        ([{"role": "user", "content": [{"type": "picture"}]}], r"content part 0 has unsupported type 'picture'"),
        ([{"role": "user", "content": [{"type": "text"}]}], r"content part 0 \(text\) needs a str 'text'"),
        ("hello", r"messages must be a list"),
    ],
)
def test_invalid_messages(tok: QwenTokenizer, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


def test_cache_reused(tok: QwenTokenizer, cache_dir):
    files = list(cache_dir.glob("*.json"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    again = load_tokenizer(cache_dir=cache_dir)
    assert files[0].stat().st_mtime_ns == mtime
    assert not list(cache_dir.glob("*.tmp"))
    assert again.encode(FIXED_CORPUS[6]) == tok.encode(FIXED_CORPUS[6])


def test_env_cache_dir(tok: QwenTokenizer, cache_dir, monkeypatch):
    monkeypatch.setenv("OMNI_JAX_CACHE", str(cache_dir))
    again = load_tokenizer()
    assert len(list(cache_dir.glob("*.json"))) == 1
    assert again.encode("hello") == tok.encode("hello")


def test_load_from_tokenizer_json(tok: QwenTokenizer, corpus, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path)
    assert loaded.vocab_size == tok.vocab_size
    for s in corpus:
        assert loaded.encode(s) == tok.encode(s), repr(s)


def test_load_from_vocab_merges(tok: QwenTokenizer, corpus, tmp_path):
    tok.backend.model.save(str(tmp_path))
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    loaded = load_tokenizer(tmp_path)
    assert loaded.vocab_size == tok.vocab_size
    for s in corpus:
        assert loaded.encode(s) == tok.encode(s), repr(s)
    assert loaded.decode(loaded.encode(FIXED_CORPUS[17]), skip_special_tokens=True) == tok.decode(
        tok.encode(FIXED_CORPUS[17]), skip_special_tokens=True)


def test_load_from_vocab_merges_with_tokenizer_config(tok: QwenTokenizer, tmp_path):
    """Added tokens declared in tokenizer_config.json (HF checkpoint layout) are honoured."""
    tok.backend.model.save(str(tmp_path))
    decoder = {str(t["id"]): {"content": t["content"], "special": t["special"], "lstrip": False,
                              "normalized": False, "rstrip": False, "single_word": False} for t in ADDED}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    loaded = load_tokenizer(tmp_path)
    s = FIXED_CORPUS[19]
    assert loaded.encode(s) == tok.encode(s)


def test_checkpoint_dir_without_files_falls_back(tok: QwenTokenizer, cache_dir, tmp_path):
    loaded = load_tokenizer(tmp_path, cache_dir=cache_dir)
    assert loaded.encode(FIXED_CORPUS[4]) == tok.encode(FIXED_CORPUS[4])
    assert os.listdir(tmp_path) == []


def test_content_parts_render_audio_placeholders(tok: QwenTokenizer):
    """List content: parts in order, each audio clip as <|audio_start|><|audio_pad|><|audio_end|>; the pads are
    then expanded to each clip's encoder rows."""
    from omni_jax.processing import audio

    msgs = [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}, {"type": "text", "text": "What is it?"},
                                         {"type": "audio", "audio": "b.wav"}]}]
    text = tok.apply_chat_template_text(msgs)
    assert text == ("<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|>What is it?"
                    "<|audio_start|><|audio_pad|><|audio_end|><|im_end|>\n<|im_start|>assistant\n")
    plain = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert tok.apply_chat_template(plain) == tok.apply_chat_template([{"role": "user", "content": "hi"}])
    pad = tok.token_to_id("<|audio_pad|>")
    ids = tok.apply_chat_template(msgs)
    out = audio.expand_audio_pads(ids, pad, [9, 13])
    assert len(out) == len(ids) + 8 + 12 and out.count(pad) == 22
    first = out.index(pad)
    assert out[first - 1] == tok.token_to_id("<|audio_start|>") and out[first + 9] == tok.token_to_id("<|audio_end|>")
    with pytest.raises(UsageError, match="2 audio placeholder"):
        audio.expand_audio_pads(ids, pad, [9])


def test_split_reasoning(tok: QwenTokenizer):
    """A Thinking model's `<think> ... </think>` block is split off the answer, also when the template opened it
    or the budget cut it off; replies without one are all answer."""
    think, end = tok.token_to_id("<think>"), tok.token_to_id("</think>")
    thought, answer = tok.encode("Let me see."), tok.encode("Paris.")
    im_end = tok.token_to_id("<|im_end|>")
    assert tok.split_reasoning([think, *thought, end, *answer, im_end]) == (thought, [*answer, im_end])
    assert tok.split_reasoning([*thought, end, *answer]) == (thought, answer)  # the prompt opened <think>
    assert tok.split_reasoning([think, *thought]) == (thought, [])  # cut off while thinking
    assert tok.split_reasoning(answer) == (None, answer)


# A template of our own, unlike the built-in ChatML (numbered audio clips, a default system turn), that walks
# content parts the way Qwen's does.
OWN_TEMPLATE = (
    "{% if messages[0].role != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n{% endif %}"
    "{% set ns = namespace(audio=0) %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is string and not m.content %}{{ raise_exception('empty message') }}{% endif %}"
    "{% if m.content is string %}{{ m.content }}"
    "{% else %}{% for p in m.content %}"
    "{% if p.type == 'audio' %}{% set ns.audio = ns.audio + 1 %}Audio {{ ns.audio }}: "
    "<|audio_start|><|audio_pad|><|audio_end|>\n"
    "{% elif p.type == 'text' %}{{ p.text }}"
    "{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("where", ["chat_template.jinja", "chat_template.json", "tokenizer_config.json"])
def test_checkpoint_chat_template_is_rendered_with_jinja(tok: QwenTokenizer, tmp_path, where):
    tok.save(tmp_path / "tokenizer.json")
    if where == "chat_template.jinja":
        (tmp_path / where).write_text(OWN_TEMPLATE)
    else:
        (tmp_path / where).write_text(json.dumps({"chat_template": OWN_TEMPLATE}))
    own = load_tokenizer(tmp_path)
    assert own.chat_template == OWN_TEMPLATE
    messages = [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}, {"type": "text", "text": "and"},
                                             {"type": "audio", "audio": "b.wav"}]}]
    text = own.apply_chat_template_text(messages)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAudio 1: "
                    "<|audio_start|><|audio_pad|><|audio_end|>\nandAudio 2: <|audio_start|><|audio_pad|><|audio_end|>\n"
                    "<|im_end|>\n<|im_start|>assistant\n")
    assert own.apply_chat_template(messages) == tok.encode(text)
    assert own.apply_chat_template(messages, add_generation_prompt=False) == tok.encode(text)[:-3]
    with pytest.raises(ValueError, match="chat template failed on these messages: empty message"):
        own.apply_chat_template([{"role": "user", "content": ""}])
    # Without a template file the built-in ChatML is used.
    plain = tmp_path / "plain"
    plain.mkdir()
    tok.save(plain / "tokenizer.json")
    assert load_tokenizer(plain).chat_template is None
    assert load_tokenizer(plain).apply_chat_template(messages) == tok.apply_chat_template(messages)


def test_broken_chat_template_is_named(tok: QwenTokenizer, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match="chat template does not parse"):
        load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}])
