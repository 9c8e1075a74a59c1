"""PiecewiseConfig: defaults, env parsing, precedence, and errors that name the culprit."""
from __future__ import annotations

import logging

import pytest

from torchpcg import ConfigError, PiecewiseConfig
from torchpcg.config import default_capture_sizes


def test_default_schedule_matches_design():
    sizes = default_capture_sizes(512)
    assert sizes[:5] == (1, 2, 4, 8, 16)
    assert sizes[sizes.index(256) - 1] == 248 and sizes[sizes.index(256) + 1] == 288
    assert sizes[-1] == 512 and list(sizes) == sorted(set(sizes))
    assert PiecewiseConfig().buckets == sizes


def test_default_schedule_ends_at_an_odd_max():
    assert default_capture_sizes(100) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 100)


def test_env_is_read_and_options_win():
    env = {"TORCHPCG_CAPTURE_SIZES": "8,2,2,4", "TORCHPCG_COMPILER": "eager", "TORCHPCG_COPY_OUTPUTS": "0"}
    cfg = PiecewiseConfig.from_env(env)
    assert cfg.buckets == (2, 4, 8) and cfg.compiler == "eager" and cfg.copy_outputs is False
    cfg = PiecewiseConfig.resolve({"compiler": "inductor", "capture_sizes": [16]}, environ=env)
    assert cfg.compiler == "inductor" and cfg.buckets == (16,) and cfg.copy_outputs is False


def test_sizes_are_capped_at_the_max():
    cfg = PiecewiseConfig.resolve({"capture_sizes": "1,2,4,1024", "max_capture_size": 16}, environ={})
    assert cfg.buckets == (1, 2, 4)


@pytest.mark.parametrize("var, value, words", [
    ("TORCHPCG_CAPTURE_SIZES", "1,x", "comma-separated positive ints"),
    ("TORCHPCG_CAPTURE_SIZES", "0,4", "comma-separated positive ints"),
    ("TORCHPCG_CAPTURE_SIZES", "-2", "comma-separated positive ints"),
    ("TORCHPCG_MAX_CAPTURE_SIZE", "0", "positive integer"),
    ("TORCHPCG_MAX_CAPTURE_SIZE", "big", "positive integer"),
    ("TORCHPCG_COMPILER", "tvm", "inductor, eager"),
    ("TORCHPCG_CUDAGRAPH", "always", "auto, cuda, emulate, off"),
    ("TORCHPCG_ENFORCE", "maybe", "expected 1 or 0"),
    ("TORCHPCG_SPLIT_OPS", "attention", "namespace::op"),
])
def test_bad_env_values_name_variable_value_and_allowed(var, value, words):
    with pytest.raises(ConfigError) as info:
        PiecewiseConfig.from_env({var: value})
    message = str(info.value)
    assert var in message and repr(value) in message and words in message


def test_unknown_option_key_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown torchpcg option 'capture_size'.*capture_sizes"):
        PiecewiseConfig.resolve({"capture_size": [1]}, environ={})


def test_all_sizes_above_max_is_an_error():
    with pytest.raises(ConfigError, match="every size is above max_capture_size=8"):
        PiecewiseConfig.resolve({"capture_sizes": "16,32", "max_capture_size": 8}, environ={})


def test_bool_option_rejects_garbage():
    with pytest.raises(ConfigError, match="copy_outputs='sometimes'"):
        PiecewiseConfig.resolve({"copy_outputs": "sometimes"}, environ={})


def test_a_misspelled_variable_warns_with_the_closest_name(caplog: pytest.LogCaptureFixture) -> None:
    from torchpcg import config as config_module

    config_module._warned_unknown.discard("TORCHPCG_CAPTURE_SIZE")
    with caplog.at_level(logging.WARNING, logger="torchpcg"):
        cfg = PiecewiseConfig.from_env({"TORCHPCG_CAPTURE_SIZE": "1,2", "TORCHPCG_VIT_CUDA_GRAPH": "full"})
        PiecewiseConfig.from_env({"TORCHPCG_CAPTURE_SIZE": "1,2"})  # once per name, not per resolve
    assert cfg.capture_sizes is None  # ignored, as the message says
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["TORCHPCG_CAPTURE_SIZE is not a torchpcg variable and is ignored; did you mean "
                        "TORCHPCG_CAPTURE_SIZES?"]
