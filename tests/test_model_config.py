"""Model configuration: validation, presets, the global/local pattern and per-layer RoPE theta of the spec,
and the parameter counts of the paper (Table 5: 377.0M, 9.0% embedding at vocab 32,979)."""
import dataclasses
import json
import math

import pytest
import torch

from megatron_cmbert.kernels.reference import rope_reference
from megatron_cmbert.model import CMBertForMaskedLM, ModelConfig, count_parameters, get_preset


@pytest.mark.parametrize("changes, message", [
    ({"hidden_size": 100, "num_attention_heads": 16}, "not divisible by num_attention_heads"),
    ({"local_attention": 127}, "even window"),
    ({"normalization": "BatchNorm"}, "normalization must be one of"),
    ({"num_layers": 0}, "num_layers must be positive"),
    ({"hidden_size": 48, "num_attention_heads": 16}, "head_dim 3 must be even"),
])
def test_invalid_configs_raise_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**changes)


def test_heads_not_divisible_by_tensor_parallel_size():
    with pytest.raises(ValueError, match="num_attention_heads 4 is not divisible by tensor_model_parallel_size 3"):
        get_preset("tiny").validate_parallel(3)


def test_large_preset_is_the_paper_model():
    c = get_preset("large")
    assert (c.num_layers, c.hidden_size, c.num_attention_heads, c.ffn_hidden_size) == (28, 1024, 16, 2624)
    assert (c.local_attention, c.global_rope_theta, c.local_rope_theta) == (128, 80_000.0, 10_000.0)
    assert (c.normalization, c.norm_eps, c.max_position_embeddings) == ("RMSNorm", 1e-5, 8192)


def test_global_local_pattern_and_theta_per_layer():
    c = get_preset("large")
    globals_ = [i for i in range(28) if c.is_global_layer(i)]
    assert globals_ == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]  # 10 global, 18 local (HF ModernBERT's rule: layer i is global when i % 3 == 0)
    for i in range(28):
        assert c.rope_theta(i) == (80_000.0 if i in globals_ else 10_000.0)
        # local_attention 128 = keys with |i - j| <= 64, flash-attn window_size (64, 64)
        assert c.attention_window(i) == ((-1, -1) if i in globals_ else (64, 64))
    assert c.layer_types[:4] == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    tiny = get_preset("tiny")
    assert "full_attention" in tiny.layer_types and "sliding_attention" in tiny.layer_types
    assert get_preset("tiny", global_attn_every_n_layers=0).layer_types == ["sliding_attention"] * 3


def test_model_layers_carry_the_theta_and_window_of_their_type():
    c = get_preset("tiny")
    model = CMBertForMaskedLM(c)
    assert [layer.attn.theta for layer in model.model.layers] == [80_000.0, 10_000.0, 10_000.0]
    assert [layer.attn.window for layer in model.model.layers] == [(-1, -1), (4, 4), (4, 4)]
    assert isinstance(model.model.layers[0].attn_norm, torch.nn.Identity)
    assert not isinstance(model.model.layers[1].attn_norm, torch.nn.Identity)


def test_rotary_frequencies_match_the_formula():
    positions = torch.tensor([0, 1, 7])
    # Rotating unit vectors reads cos and sin back: e_i -> cos at i, sin at i + d/2 (rotate_half layout).
    unit = torch.eye(8)[None].expand(3, 8, 8)  # (tokens, "heads" = which unit vector, head_dim)
    rotated, _ = rope_reference(unit, unit, positions, 80_000.0)
    cos = torch.stack([rotated[:, i, i] for i in range(4)] * 2, dim=1)
    sin = torch.stack([rotated[:, i, i + 4] for i in range(4)] * 2, dim=1)
    for row, p in enumerate([0, 1, 7]):
        for i in range(4):  # inv_freq_i = 1 / theta^(2i/d), both halves share it (rotate_half layout)
            angle = p / 80_000.0 ** (2 * i / 8)
            for col in (i, i + 4):
                assert cos[row, col].item() == pytest.approx(math.cos(angle), abs=1e-6)
                assert sin[row, col].item() == pytest.approx(math.sin(angle), abs=1e-6)


def test_paper_parameter_count_by_arithmetic():
    # Hand count: embedding 32979*1024; per layer 4*1024^2 (attention) + 3*1024*2624 (GeGLU) + norms.
    counts = count_parameters(get_preset("large", vocab_size=32979))
    per_layer = 4 * 1024 ** 2 + 3 * 1024 * 2624
    assert counts.embedding == 32979 * 1024
    assert counts.parameters == 32979 * 1024 + 28 * per_layer + (28 + 27 + 2) * 1024 == 376_975_360
    assert f"{counts.parameters / 1e6:.1f}M" == "377.0M" and f"{100 * counts.embedding_share:.1f}%" == "9.0%"


@pytest.mark.parametrize("preset", ["tiny", "base", "large"])
def test_arithmetic_count_matches_meta_device_model(preset):
    config = get_preset(preset)
    with torch.device("meta"):
        model = CMBertForMaskedLM(config)
    counts = count_parameters(config)
    total = sum(p.numel() for p in model.parameters())
    assert total == counts.parameters + counts.vocab_padding + counts.mlm_head
    assert sum(p.numel() for p in model.model.parameters()) == counts.parameters + counts.vocab_padding


def test_model_summary_tool_prints_paper_numbers(capsys):
    from tools.model_summary import main

    assert main(["--preset", "large", "--vocab-size", "32979", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["parameters"] == 376_975_360 and summary["parameters_human"] == "377.0M"
    assert summary["embedding_share_human"] == "9.0%" and round(summary["embedding_share"], 3) == 0.090
    assert (summary["layers"], summary["global_layers"]) == (28, 10)


def test_initialisation_is_truncated_normal_with_depth_scaled_outputs():
    config = get_preset("tiny", hidden_size=128, ffn_hidden_size=256, num_layers=8)
    torch.manual_seed(0)
    model = CMBertForMaskedLM(config)
    std_in, std_out = 0.02, 0.02 / math.sqrt(2 * 8)
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        elif name == "decoder_bias":
            assert torch.equal(p, torch.zeros_like(p))
        else:
            std = std_out if name.endswith(("attn.Wo.weight", "mlp.Wo.weight", "head.dense.weight")) else std_in
            assert p.abs().max() <= 2 * std, name  # truncated at 2 sigma
            # a normal truncated at 2 sigma has std 0.880 sigma; thousands of samples pin it to a few %
            assert abs(p.std().item() / (0.880 * std) - 1) < 0.05, name


def test_kernel_fields_survive_config_json_and_old_configs_load():
    from megatron_cmbert.kernels.registry import KernelChoice

    config = get_preset("tiny", kernels="reference,attention=flex")
    saved = json.loads(json.dumps(config.to_dict()))
    assert saved["kernels"] == {"attention": "flex", "rope": "reference", "geglu": "reference", "rms_norm": "reference"}
    assert ModelConfig.from_dict(saved).kernels == KernelChoice.parse("reference,attention=flex")
    # a checkpoint of before KernelChoice: two text fields
    legacy = {k: v for k, v in saved.items() if k != "kernels"} | {"kernel_backend": "reference",
                                                                      "kernel_overrides": "attention=flex"}
    assert ModelConfig.from_dict(legacy).kernels == config.kernels
    old = {k: v for k, v in saved.items() if k != "kernels"}  # a checkpoint from before the fields
    assert ModelConfig.from_dict(old).kernels == KernelChoice()
    assert ModelConfig.from_dict(old) == config  # the kernels are not part of the architecture (compare=False)
    with pytest.raises(ValueError, match="'flex' is neither op=backend"):
        get_preset("tiny", kernels="flex")
