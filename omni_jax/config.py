"""Frozen model configuration parsed from a Hugging Face Qwen3-Omni ``config.json``.

The HF file nests thinker / talker / code2wav trees; we keep the HF field names so a
reader can hold the two side by side, and validate eagerly so a bad file fails at load
time with the offending key named, not deep inside a jitted trace.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping
from omni_jax.errors import OmniError, UsageError


class ConfigError(OmniError, ValueError):
    """A config.json is missing a key or holds an inconsistent value."""


class ConfigNotFoundError(UsageError, ConfigError, FileNotFoundError):
    """No config at the given path / name (a usage error, exit 2)."""


def _get(tree: Mapping[str, Any], key: str, path: str, default: Any = dataclasses.MISSING) -> Any:
    if key in tree:
        return tree[key]
    if default is dataclasses.MISSING:
        raise ConfigError(f"config key '{path}.{key}' is required but missing")
    return default


def _sub(tree: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
    value = _get(tree, key, path)
    if not isinstance(value, Mapping):
        raise ConfigError(f"config key '{path}.{key}' must be an object, got {type(value).__name__}")
    return value


def _check(cond: bool, path: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{path}': {msg}")


@dataclasses.dataclass(frozen=True)
class TransformerShape:
    """What every transformer stack here has: widths, depth, attention heads, norm epsilon, RoPE base."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float


@dataclasses.dataclass(frozen=True)
class DecoderConfig(TransformerShape):
    """A (possibly MoE) causal decoder: thinker text model, talker, code predictor."""

    vocab_size: int
    mrope_section: tuple[int, ...] | None  # None: plain 1-D RoPE
    mrope_interleaved: bool = True
    attention_bias: bool = False
    use_qk_norm: bool = True
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    hidden_act: str = "silu"
    # The talker's HF decoder layer always builds a sparse block, ignoring mlp_only_layers.
    always_sparse: bool = False

    def is_sparse(self, layer: int) -> bool:
        if self.num_experts <= 0:
            return False
        if self.always_sparse:
            return True
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0

    @property
    def rope_dim(self) -> int:
        return self.head_dim

    @classmethod
    def from_hf(cls, tree: Mapping[str, Any], path: str, *, moe: bool, always_sparse: bool = False) -> "DecoderConfig":
        rope = tree.get("rope_parameters") or {}
        theta = rope.get("rope_theta", tree.get("rope_theta"))
        _check(theta is not None, f"{path}.rope_parameters.rope_theta", "required but missing")
        rope_type = rope.get("rope_type", "default")
        _check(rope_type == "default", f"{path}.rope_parameters.rope_type", f"only 'default' is supported, got {rope_type!r}")
        heads = int(_get(tree, "num_attention_heads", path))
        hidden = int(_get(tree, "hidden_size", path))
        head_dim = int(tree.get("head_dim") or hidden // heads)
        section = rope.get("mrope_section")
        kv = int(_get(tree, "num_key_value_heads", path, heads))
        cfg = cls(
            vocab_size=int(_get(tree, "vocab_size", path)),
            hidden_size=hidden,
            intermediate_size=int(_get(tree, "intermediate_size", path)),
            num_hidden_layers=int(_get(tree, "num_hidden_layers", path)),
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            rms_norm_eps=float(_get(tree, "rms_norm_eps", path, 1e-6)),
            rope_theta=float(theta),
            mrope_section=tuple(int(s) for s in section) if section is not None else None,
            mrope_interleaved=bool(rope.get("mrope_interleaved", rope.get("interleaved", True))),
            attention_bias=bool(tree.get("attention_bias", False)),
            use_qk_norm=bool(tree.get("use_qk_norm", True)),
            num_experts=int(tree.get("num_experts", tree.get("num_local_experts", 0))) if moe else 0,
            num_experts_per_tok=int(tree.get("num_experts_per_tok", 0)) if moe else 0,
            moe_intermediate_size=int(tree.get("moe_intermediate_size", 0)) if moe else 0,
            shared_expert_intermediate_size=int(tree.get("shared_expert_intermediate_size", 0) or 0) if moe else 0,
            norm_topk_prob=bool(tree.get("norm_topk_prob", True)),
            decoder_sparse_step=int(tree.get("decoder_sparse_step", 1) or 1),
            mlp_only_layers=tuple(int(i) for i in (tree.get("mlp_only_layers") or ())),
            hidden_act=str(tree.get("hidden_act", "silu")),
            always_sparse=always_sparse,
        )
        cfg.validate(path)
        return cfg

    def validate(self, path: str) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim"):
            _check(getattr(self, name) > 0, f"{path}.{name}", f"must be positive, got {getattr(self, name)}")
        _check(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"{path}.num_key_value_heads",
            f"{self.num_key_value_heads} does not divide num_attention_heads={self.num_attention_heads}",
        )
        _check(self.head_dim % 2 == 0, f"{path}.head_dim", f"must be even for RoPE, got {self.head_dim}")
        _check(self.hidden_act == "silu", f"{path}.hidden_act", f"only 'silu' is supported, got {self.hidden_act!r}")
        if self.mrope_section is not None:
            _check(len(self.mrope_section) == 3, f"{path}.rope_parameters.mrope_section", "needs 3 entries (t, h, w)")
            _check(
                sum(self.mrope_section) == self.head_dim // 2,
                f"{path}.rope_parameters.mrope_section",
                f"sums to {sum(self.mrope_section)} but head_dim//2 is {self.head_dim // 2}",
            )
        if self.num_experts > 0:
            _check(
                0 < self.num_experts_per_tok <= self.num_experts,
                f"{path}.num_experts_per_tok",
                f"must be in [1, num_experts={self.num_experts}], got {self.num_experts_per_tok}",
            )
            _check(self.moe_intermediate_size > 0, f"{path}.moe_intermediate_size", "must be positive for a MoE model")
        for layer in self.mlp_only_layers:
            _check(0 <= layer < self.num_hidden_layers, f"{path}.mlp_only_layers", f"layer {layer} out of range")


@dataclasses.dataclass(frozen=True)
class AudioEncoderConfig:
    """The AuT audio encoder (thinker_config.audio_config): conv downsampling, windowed transformer, projection."""

    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    num_mel_bins: int
    n_window: int  # mel frames per conv chunk: 2 * n_window
    n_window_infer: int  # mel frames per attention window (a multiple of the chunk)
    downsample_hidden_size: int
    output_dim: int
    max_source_positions: int

    @property
    def chunk_frames(self) -> int:
        return 2 * self.n_window

    @property
    def chunks_per_window(self) -> int:
        return self.n_window_infer // self.chunk_frames

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @classmethod
    def from_hf(cls, tree: Mapping[str, Any], path: str) -> "AudioEncoderConfig":
        # transformers' Qwen3OmniMoeAudioEncoderConfig defaults fill keys a config leaves out, as it does there.
        defaults = dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                        num_mel_bins=128, n_window=50, n_window_infer=800, downsample_hidden_size=480,
                        output_dim=3584, max_source_positions=1500)
        out = cls(**{f.name: int(_get(tree, f.name, path, defaults[f.name])) for f in dataclasses.fields(cls)})
        for name in ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "num_mel_bins",
                     "n_window", "downsample_hidden_size", "output_dim"):
            _check(getattr(out, name) > 0, f"{path}.{name}", "must be positive")
        _check(out.d_model % out.encoder_attention_heads == 0, f"{path}.d_model",
               f"{out.d_model} is not divisible by encoder_attention_heads={out.encoder_attention_heads}")
        _check(out.d_model % 2 == 0, f"{path}.d_model", "must be even (sinusoidal positions)")
        # transformers' encoder (valid rows) and processor (placeholder count) hard-code 13 rows per chunk.
        _check(out.n_window == 50, f"{path}.n_window", f"must be 50 (100-frame chunks, 13 rows each), got {out.n_window}")
        _check(out.n_window_infer >= out.chunk_frames and out.n_window_infer % out.chunk_frames == 0,
               f"{path}.n_window_infer", f"{out.n_window_infer} must be a positive multiple of 2 * n_window "
               f"= {out.chunk_frames}")
        act = tree.get("activation_function", "gelu")
        _check(act == "gelu", f"{path}.activation_function", f"only 'gelu' is supported, got {act!r}")
        _check(not tree.get("scale_embedding", False), f"{path}.scale_embedding", "only false is supported")
        return out


@dataclasses.dataclass(frozen=True)
class VisionEncoderConfig:
    """The ViT (thinker_config.vision_config) and the token ids / timing its placeholders and positions need."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Pixels of one patch (channels x temporal x height x width): the flattened rows the processor emits."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size ** 2

    @property
    def grid_side(self) -> int:
        """Side of the learned square position table."""
        return int(round(self.num_position_embeddings ** 0.5))

    @classmethod
    def from_hf(cls, tree: Mapping[str, Any], path: str) -> "VisionEncoderConfig":
        # transformers' Qwen3OmniMoeVisionEncoderConfig defaults fill keys a config leaves out, as it does there.
        defaults = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, in_channels=3,
                        patch_size=16, temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=3584,
                        num_position_embeddings=2304)
        ints = {k: int(_get(tree, k, path, v)) for k, v in defaults.items()}
        ds = tuple(int(i) for i in _get(tree, "deepstack_visual_indexes", path, (8, 16, 24)))
        rope = tree.get("rope_parameters") or {}
        out = cls(**ints, deepstack_visual_indexes=ds, rope_theta=float(rope.get("rope_theta", 10000.0)))
        for name, value in ints.items():
            _check(value > 0, f"{path}.{name}", f"must be positive, got {value}")
        _check(out.hidden_size % out.num_heads == 0, f"{path}.hidden_size",
               f"{out.hidden_size} is not divisible by num_heads={out.num_heads}")
        _check(out.head_dim % 4 == 0, f"{path}.num_heads", f"head dim {out.head_dim} must be a multiple of 4 (2-D rotary)")
        _check(out.grid_side ** 2 == out.num_position_embeddings, f"{path}.num_position_embeddings",
               f"{out.num_position_embeddings} is not a square")
        _check(all(0 <= i < out.depth for i in ds) and len(set(ds)) == len(ds), f"{path}.deepstack_visual_indexes",
               f"{list(ds)} must be distinct block indexes in [0, {out.depth})")
        act = tree.get("hidden_act", "gelu_pytorch_tanh")
        _check(act == "gelu_pytorch_tanh", f"{path}.hidden_act", f"only 'gelu_pytorch_tanh' is supported, got {act!r}")
        return out


@dataclasses.dataclass(frozen=True)
class ThinkerConfig:
    text: DecoderConfig
    tie_word_embeddings: bool
    audio_token_id: int
    image_token_id: int
    video_token_id: int
    audio: AudioEncoderConfig | None = None  # None: a config without an audio tower
    vision: VisionEncoderConfig | None = None  # None: a config without a vision tower
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    audio_start_token_id: int = 151669
    audio_end_token_id: int = 151670
    position_id_per_seconds: float = 13.0  # M-RoPE time steps per second of video (and audio in video)


@dataclasses.dataclass(frozen=True)
class TalkerConfig:
    text: DecoderConfig
    code_predictor: DecoderConfig
    thinker_hidden_size: int
    accept_hidden_layer: int
    num_code_groups: int
    codec_bos_id: int
    codec_eos_token_id: int
    codec_pad_id: int
    codec_nothink_id: int
    codec_think_bos_id: int
    codec_think_eos_id: int
    speaker_id: tuple[tuple[str, int], ...]
    audio_token_id: int
    image_token_id: int
    video_token_id: int
    position_id_per_seconds: float = 25.0  # its own M-RoPE time steps per second (transformers' talker reads its own)

    def speaker(self, name: str) -> int:
        """Speaker codec id, case-insensitive; unknown names list the known ones."""
        table = {k.lower(): v for k, v in self.speaker_id}
        key = name.lower()
        if key not in table:
            raise UsageError(f"unknown speaker {name!r}; this checkpoint knows: {', '.join(sorted(table))}")
        return table[key]


@dataclasses.dataclass(frozen=True)
class Code2WavConfig(TransformerShape):
    """The vocoder: a sliding-window transformer (TransformerShape) over code embeddings, then the conv decoder."""

    codebook_size: int
    sliding_window: int
    layer_scale_initial_scale: float
    num_quantizers: int
    decoder_dim: int
    upsample_rates: tuple[int, ...]
    upsampling_ratios: tuple[int, ...]
    attention_bias: bool = False

    @property
    def total_upsample(self) -> int:
        """Waveform samples per code frame (1920 for the real model: 80 ms at 24 kHz)."""
        n = 1
        for r in self.upsample_rates + self.upsampling_ratios:
            n *= r
        return n


@dataclasses.dataclass(frozen=True)
class OmniConfig:
    thinker: ThinkerConfig
    talker: TalkerConfig
    code2wav: Code2WavConfig
    im_start_token_id: int
    im_end_token_id: int
    system_token_id: int
    user_token_id: int
    assistant_token_id: int
    tts_pad_token_id: int
    tts_bos_token_id: int
    tts_eos_token_id: int
    enable_audio_output: bool = True
    sample_rate: int = 24000
    raw: Mapping[str, Any] = dataclasses.field(default=None, compare=False, repr=False, hash=False)

    @classmethod
    def from_dict(cls, tree: Mapping[str, Any]) -> "OmniConfig":
        return parse_config(tree)

    def to_json(self) -> str:
        return json.dumps(self.raw, indent=2, sort_keys=True)


def parse_config(tree: Mapping[str, Any]) -> OmniConfig:
    """Parse the nested HF config tree, raising ConfigError naming the bad key."""
    th = _sub(tree, "thinker_config", "")
    th_text = DecoderConfig.from_hf(_sub(th, "text_config", "thinker_config"), "thinker_config.text_config", moe=True)
    thinker = ThinkerConfig(
        text=th_text,
        tie_word_embeddings=bool(th.get("tie_word_embeddings", th["text_config"].get("tie_word_embeddings", False))),
        audio_token_id=int(_get(th, "audio_token_id", "thinker_config")),
        image_token_id=int(_get(th, "image_token_id", "thinker_config")),
        video_token_id=int(_get(th, "video_token_id", "thinker_config")),
        audio=(AudioEncoderConfig.from_hf(_sub(th, "audio_config", "thinker_config"), "thinker_config.audio_config")
               if "audio_config" in th else None),
        vision=(VisionEncoderConfig.from_hf(_sub(th, "vision_config", "thinker_config"), "thinker_config.vision_config")
                if "vision_config" in th else None),
        vision_start_token_id=int(th.get("vision_start_token_id", 151652)),
        vision_end_token_id=int(th.get("vision_end_token_id", 151653)),
        audio_start_token_id=int(th.get("audio_start_token_id", 151669)),
        audio_end_token_id=int(th.get("audio_end_token_id", 151670)),
        position_id_per_seconds=float(th.get("position_id_per_seconds", 25)),  # transformers' default
    )
    if thinker.vision is not None:  # merger rows replace token embeddings; deepstack rows add to layer outputs
        _check(thinker.vision.out_hidden_size == th_text.hidden_size, "thinker_config.vision_config.out_hidden_size",
               f"must equal thinker_config.text_config.hidden_size={th_text.hidden_size}, got "
               f"{thinker.vision.out_hidden_size}")
        # Levels past the thinker's depth add nowhere (transformers skips them too): a 2-layer bench thinker keeps
        # the real 3-level vision config.
    if thinker.audio is not None:  # the encoder's rows replace token embeddings
        _check(thinker.audio.output_dim == th_text.hidden_size, "thinker_config.audio_config.output_dim",
               f"must equal thinker_config.text_config.hidden_size={th_text.hidden_size} (the encoder's rows replace "
               f"token embeddings), got {thinker.audio.output_dim}")
    tk = _sub(tree, "talker_config", "")
    tk_text = DecoderConfig.from_hf(_sub(tk, "text_config", "talker_config"), "talker_config.text_config", moe=True, always_sparse=True)
    cp = DecoderConfig.from_hf(
        _sub(tk, "code_predictor_config", "talker_config"), "talker_config.code_predictor_config", moe=False
    )
    speakers = _get(tk, "speaker_id", "talker_config")
    _check(isinstance(speakers, Mapping) and len(speakers) > 0, "talker_config.speaker_id", "must be a non-empty object")
    talker = TalkerConfig(
        text=tk_text,
        code_predictor=cp,
        thinker_hidden_size=int(_get(tk, "thinker_hidden_size", "talker_config")),
        accept_hidden_layer=int(_get(tk, "accept_hidden_layer", "talker_config")),
        num_code_groups=int(_get(tk, "num_code_groups", "talker_config")),
        codec_bos_id=int(_get(tk, "codec_bos_id", "talker_config")),
        codec_eos_token_id=int(_get(tk, "codec_eos_token_id", "talker_config")),
        codec_pad_id=int(_get(tk, "codec_pad_id", "talker_config")),
        codec_nothink_id=int(_get(tk, "codec_nothink_id", "talker_config")),
        codec_think_bos_id=int(_get(tk, "codec_think_bos_id", "talker_config")),
        codec_think_eos_id=int(_get(tk, "codec_think_eos_id", "talker_config")),
        speaker_id=tuple(sorted((str(k), int(v)) for k, v in speakers.items())),
        audio_token_id=int(tk.get("audio_token_id", thinker.audio_token_id)),
        image_token_id=int(tk.get("image_token_id", thinker.image_token_id)),
        video_token_id=int(tk.get("video_token_id", thinker.video_token_id)),
        position_id_per_seconds=float(tk.get("position_id_per_seconds", 25)),
    )
    _check(
        talker.thinker_hidden_size == th_text.hidden_size,
        "talker_config.thinker_hidden_size",
        f"{talker.thinker_hidden_size} != thinker hidden_size {th_text.hidden_size}",
    )
    _check(
        0 <= talker.accept_hidden_layer <= th_text.num_hidden_layers,
        "talker_config.accept_hidden_layer",
        f"{talker.accept_hidden_layer} outside [0, {th_text.num_hidden_layers}]",
    )
    _check(talker.num_code_groups >= 2, "talker_config.num_code_groups", "must be at least 2")
    _check(
        cp.hidden_size == tk_text.hidden_size,
        "talker_config.code_predictor_config.hidden_size",
        f"{cp.hidden_size} != talker hidden_size {tk_text.hidden_size}",
    )
    cw = _sub(tree, "code2wav_config", "")
    p = "code2wav_config"
    rope = cw.get("rope_parameters") or {}
    c2w_heads = int(_get(cw, "num_attention_heads", p))
    c2w_hidden = int(_get(cw, "hidden_size", p))
    _check(c2w_hidden % c2w_heads == 0, f"{p}.num_attention_heads", f"{c2w_heads} does not divide hidden_size={c2w_hidden}")
    code2wav = Code2WavConfig(
        codebook_size=int(_get(cw, "codebook_size", p)),
        hidden_size=c2w_hidden,
        intermediate_size=int(_get(cw, "intermediate_size", p)),
        num_hidden_layers=int(_get(cw, "num_hidden_layers", p)),
        num_attention_heads=c2w_heads,
        num_key_value_heads=int(cw.get("num_key_value_heads", c2w_heads)),
        head_dim=int(cw.get("head_dim") or c2w_hidden // c2w_heads),
        sliding_window=int(_get(cw, "sliding_window", p)),
        rms_norm_eps=float(cw.get("rms_norm_eps", 1e-5)),
        rope_theta=float(rope.get("rope_theta", cw.get("rope_theta", 10000.0))),
        layer_scale_initial_scale=float(cw.get("layer_scale_initial_scale", 0.01)),
        num_quantizers=int(_get(cw, "num_quantizers", p)),
        decoder_dim=int(_get(cw, "decoder_dim", p)),
        upsample_rates=tuple(int(r) for r in _get(cw, "upsample_rates", p)),
        upsampling_ratios=tuple(int(r) for r in _get(cw, "upsampling_ratios", p)),
        attention_bias=bool(cw.get("attention_bias", False)),
    )
    _check(
        code2wav.num_attention_heads % code2wav.num_key_value_heads == 0,
        f"{p}.num_key_value_heads",
        f"{code2wav.num_key_value_heads} does not divide num_attention_heads={code2wav.num_attention_heads}",
    )
    _check(
        code2wav.num_quantizers == talker.num_code_groups,
        f"{p}.num_quantizers",
        f"{code2wav.num_quantizers} != talker num_code_groups {talker.num_code_groups}",
    )
    return OmniConfig(
        thinker=thinker,
        talker=talker,
        code2wav=code2wav,
        im_start_token_id=int(tree.get("im_start_token_id", 151644)),
        im_end_token_id=int(tree.get("im_end_token_id", 151645)),
        system_token_id=int(tree.get("system_token_id", 8948)),
        user_token_id=int(tree.get("user_token_id", 872)),
        assistant_token_id=int(tree.get("assistant_token_id", 77091)),
        tts_pad_token_id=int(_get(tree, "tts_pad_token_id", "")),
        tts_bos_token_id=int(_get(tree, "tts_bos_token_id", "")),
        tts_eos_token_id=int(_get(tree, "tts_eos_token_id", "")),
        enable_audio_output=bool(tree.get("enable_audio_output", True)),
        raw=dict(tree),
    )


CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_config(path_or_name: str) -> OmniConfig:
    """Load a config.json by path, checkpoint dir, or a shipped name ('tiny', 'qwen3_omni_30b_a3b_instruct')."""
    path = path_or_name
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    elif not os.path.exists(path):
        from importlib import resources

        shipped = resources.files("omni_jax") / "configs" / f"{path_or_name}.json"
        path = str(shipped) if shipped.is_file() else os.path.join(CONFIG_DIR, f"{path_or_name}.json")
    if not os.path.exists(path):
        shipped = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".json")) if os.path.isdir(CONFIG_DIR) else []
        raise ConfigNotFoundError(f"no config at {path_or_name!r} (looked for {path}); give a config.json, a checkpoint "
                                  f"dir holding one, or a shipped name ({', '.join(shipped)})")
    with open(path) as f:
        try:
            tree = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
    return parse_config(tree)
