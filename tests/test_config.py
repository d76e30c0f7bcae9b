"""smoothquant_plus config: parse_config (the reader), SqplusConfig.to_dict (the writer), the
group-size rule (no vLLM needed). The exporter's tests are in test_export.py."""
from __future__ import annotations

import pytest

from vllm_sqplus.config import (ENV_BACKEND, GROUP_SIZES, SqplusConfig, check_group_size_supported,
                                group_size_supported, parse_config)
from vllm_sqplus.errors import SqplusError

QM = {"quant_method": "smoothquant_plus"}


def test_defaults_for_a_plain_checkpoint():
    c = parse_config(None, env={})
    assert (c.bits, c.group_size, c.zero_point, c.kernel_backend, c.format) == (4, 128, True, "auto", "smoothed")
    assert not c.smoothed and not c.prequantized
    assert c.modules_to_not_convert == ["lm_head", "embed_tokens"]


def test_smoothed_config_is_read():
    c = parse_config({**QM, "bits": 4, "group_size": 64, "zero_point": False, "alpha": 0.7,
                      "modules_to_not_convert": ["lm_head", "mlp.down_proj"]}, env={})
    assert (c.group_size, c.zero_point, c.smoothed) == (64, False, True)
    assert c.skip("model.layers.3.mlp.down_proj") and c.skip("lm_head")
    assert not c.skip("model.layers.3.mlp.up_proj")


@pytest.mark.parametrize("g", [32, 64, 128, -1])
def test_group_sizes_accepted(g):
    assert parse_config({**QM, "group_size": g}, env={}).group_size == g


@pytest.mark.parametrize("bad, match", [
    ({"quant_method": "awq"}, "expected 'smoothquant_plus'"),
    ({"bits": 8}, "bits must be 4"),
    ({"bits": True}, "bits must be 4"),
    ({"group_size": 96}, "group_size must be one of"),
    ({"group_size": "128"}, "group_size must be one of"),
    ({"zero_point": 2}, "zero_point must be true or false"),
    ({"modules_to_not_convert": "lm_head"}, "modules_to_not_convert must be a list"),
    ({"kernel_backend": "marlin"}, "kernel_backend must be one of"),
    ({"format": "awq"}, "format must be one of"),
])
def test_bad_values_are_clear_errors(bad, match):
    with pytest.raises(SqplusError, match=match):
        parse_config({**QM, **bad}, env={})


def test_env_var_overrides_kernel_backend():
    assert parse_config({**QM, "kernel_backend": "sqplus"}, env={ENV_BACKEND: "reference"}).kernel_backend == "reference"
    with pytest.raises(SqplusError, match=f"env {ENV_BACKEND} must be one of"):
        parse_config({**QM}, env={ENV_BACKEND: "fast"})


# ---- the one group-size rule ------------------------------------------------------------------------
@pytest.mark.parametrize("k,g,eff", [(4096, 128, 128), (896, 64, 64), (864, 32, 32), (100, -1, 100)])
def test_group_size_rule_accepts(k, g, eff):
    assert group_size_supported(k, g) == (True, "")
    assert check_group_size_supported(k, g, "layers.0.mlp.down_proj") == eff


@pytest.mark.parametrize("k,g,match", [
    (4096, 16, r"group_size must be one of \[32, 64, 128, -1\], got 16"),   # divides K, still refused
    (4096, 256, "got 256"),
    (4096, True, "got True"),
    (4096, "128", "got '128'"),
    (864, 128, r"layers.0.mlp.down_proj: in_features 864 is not a multiple of group_size 128; "
               r"group sizes that fit: \[32\]"),
    (100, 32, r"in_features 100 is not a multiple of group_size 32; use group_size -1"),
])
def test_group_size_rule_rejects_with_one_line(k, g, match):
    ok, why = group_size_supported(k, g)
    assert not ok and "\n" not in why
    with pytest.raises(SqplusError, match=match):
        check_group_size_supported(k, g, "layers.0.mlp.down_proj")


def test_config_group_sizes_are_the_rule():
    for g in GROUP_SIZES:
        assert parse_config({**QM, "group_size": g}, env={}).group_size == g
    with pytest.raises(SqplusError, match=r"group_size must be one of \[32, 64, 128, -1\], got 16"):
        parse_config({**QM, "group_size": 16}, env={})


# ---- the one writer ----------------------------------------------------------------------------------
def test_to_dict_round_trips_and_keeps_extra_keys():
    c = SqplusConfig(group_size=64, zero_point=False, modules_to_not_convert=["lm_head"])
    d = c.to_dict(extra={"alpha": 0.55, "group_size": 999, "kernel_backend": "auto"})
    assert d == {"alpha": 0.55, "quant_method": "smoothquant_plus", "bits": 4, "group_size": 64,
                 "zero_point": False, "modules_to_not_convert": ["lm_head"], "format": "smoothed"}
    back = parse_config(d, env={})
    assert back == c  # the reader gives back what the writer was given
    assert SqplusConfig(kernel_backend="sqplus").to_dict()["kernel_backend"] == "sqplus"
    # an environment override is a run's choice, never written: parse with env, write -> no key
    assert "kernel_backend" not in parse_config(d, env={ENV_BACKEND: "auto"}).to_dict()
