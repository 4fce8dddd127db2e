"""Config parsing: the shipped configs load, and bad files fail naming the offending key."""

import copy
import json

import pytest

from omni_jax.config import ConfigError, load_config, parse_config
from tests import reference


def test_real_config_values():
    cfg = load_config("configs/qwen3_omni_30b_a3b_instruct.json")
    t = cfg.thinker.text
    assert (t.num_hidden_layers, t.hidden_size, t.num_experts, t.num_experts_per_tok) == (48, 2048, 128, 8)
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.vocab_size) == (32, 4, 128, 152064)
    assert t.mrope_section == (24, 20, 20) and t.mrope_interleaved and t.norm_topk_prob
    tk = cfg.talker.text
    assert (tk.num_hidden_layers, tk.num_experts, tk.num_experts_per_tok, tk.shared_expert_intermediate_size) == (20, 128, 6, 768)
    assert tk.always_sparse and cfg.talker.accept_hidden_layer == 24
    assert cfg.talker.code_predictor.num_hidden_layers == 5 and cfg.talker.code_predictor.mrope_section is None
    assert cfg.code2wav.total_upsample == 1920 and cfg.code2wav.sliding_window == 72
    assert cfg.talker.speaker("Ethan") == 2302


def test_tiny_config_loads_by_name():
    assert load_config("tiny").thinker.text.hidden_size == 64


def test_unknown_speaker_lists_known():
    with pytest.raises(ValueError, match="aiden, chelsie, ethan"):
        load_config("tiny").talker.speaker("bob")


def _tiny():
    return reference.tiny_config_dict()


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda c: c["thinker_config"]["text_config"].pop("hidden_size"), "thinker_config.text_config.hidden_size"),
        (lambda c: c.pop("talker_config"), "talker_config"),
        (lambda c: c["code2wav_config"].pop("sliding_window"), "code2wav_config.sliding_window"),
        (lambda c: c["thinker_config"]["text_config"].update(num_key_value_heads=3),
         "thinker_config.text_config.num_key_value_heads"),
        (lambda c: c["code2wav_config"].update(num_attention_heads=5), "code2wav_config.num_attention_heads"),
        (lambda c: c["thinker_config"]["text_config"]["rope_parameters"].update(mrope_section=[2, 2, 2]),
         "thinker_config.text_config.rope_parameters.mrope_section"),
        (lambda c: c["thinker_config"]["text_config"].update(num_experts_per_tok=99),
         "thinker_config.text_config.num_experts_per_tok"),
        (lambda c: c["talker_config"].update(accept_hidden_layer=9), "talker_config.accept_hidden_layer"),
        (lambda c: c["talker_config"].update(thinker_hidden_size=32), "talker_config.thinker_hidden_size"),
        (lambda c: c["thinker_config"]["text_config"].update(mlp_only_layers=[7]),
         "thinker_config.text_config.mlp_only_layers"),
        (lambda c: c["thinker_config"]["audio_config"].update(output_dim=32), "thinker_config.audio_config.output_dim"),
    ],
)
def test_bad_config_names_the_key(mutate, key):
    cfg = copy.deepcopy(_tiny())
    mutate(cfg)
    with pytest.raises(ConfigError) as err:
        parse_config(cfg)
    assert key in str(err.value)


def test_invalid_json_is_a_config_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(str(path))


def test_missing_config_file():
    with pytest.raises(FileNotFoundError):
        load_config("/nonexistent/dir/config.json")


def test_checkpoint_dir_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_tiny()))
    assert load_config(str(tmp_path)).talker.num_code_groups == 16
