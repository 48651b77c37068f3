"""The training CLI is generated from the TrainConfig dataclasses: defaults, help text from the field
docstrings, every ModelConfig field reachable, Megatron flag names, validation as one typed error."""
import dataclasses
import os
import re
import shlex

import pytest

from megatron_cmbert.model.config import ModelConfig, get_preset
from megatron_cmbert.training.config import (ConfigError, DataConfig, ModelOverrides, TrainConfig,
                                             add_dataclass_args, field_docs)
from megatron_cmbert.training.schedules import ScheduleConfig
from tools import pretrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINIMAL = ["--tokenizer-model", "tok", "--data-path", "d_text_document", "--train-iters", "50"]


def parse(*extra):
    return pretrain.parse_args(MINIMAL + list(extra))


def test_defaults_are_the_dataclass_defaults():
    cfg = parse()
    assert cfg == TrainConfig(data=DataConfig(tokenizer_model="tok", data_path=["d_text_document"]),
                              schedule=ScheduleConfig(train_iters=50))
    # a few values written out by hand (the paper's and Megatron's defaults), not read from the code
    assert (cfg.optimizer.adam_beta2, cfg.optimizer.weight_decay, cfg.optimizer.decay_embeddings) == (0.95, 0.1, True)
    assert (cfg.model.preset, cfg.model.global_rope_theta, cfg.parallel.tensor_model_parallel_size) == ("tiny", None, 1)
    assert (cfg.checkpoint.overwrite, cfg.checkpoint.keep_last, cfg.logging.log_interval, cfg.seed) == (False, 0, 10, 1234)


def test_help_comes_from_the_field_docstrings(capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrain.run(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse re-wraps lines
    for phrase in ("Samples per optimizer step, all data-parallel ranks and accumulation steps together. (default 32)",
                   "Total optimizer steps, warmup included.",
                   "RoPE base of global layers (stock ModernBERT uses 160,000; the seed paper 80,000). "
                   "Default: the preset's value.",
                   "Keep only the newest K checkpoints (0: keep all). (default 0)"):
        assert phrase in text
    for flag in ("--overwrite", "--keep-last", "--override-schedule", "--exit-duration-in-mins",
                 "--no-decay-embeddings", "--rope-theta-global"):
        assert flag in text


def test_field_docs_reads_the_literal_after_each_field():
    @dataclasses.dataclass
    class Example:
        alpha: int = 1
        """First
        line."""
        beta: str = "x"
        gamma: float = 0.5
        """Third."""

    assert field_docs(Example) == {"alpha": "First line.", "gamma": "Third."}


def _other_value(name, value):
    """A valid value different from the preset's, chosen per type."""
    if name == "normalization":
        return "LayerNorm" if value == "RMSNorm" else "RMSNorm"
    if name == "local_attention":
        return value + 2
    if name == "pad_token_id":
        return value + 1
    if name == "kernels":
        from megatron_cmbert.kernels.registry import KernelChoice

        return KernelChoice.parse("triton,attention=reference")
    if name == "hidden_size":
        return value * 2
    if name in ("num_attention_heads", "global_attn_every_n_layers"):
        return 2 if value != 2 else 1
    return value * 2 if isinstance(value, (int, float)) else value


def test_every_model_config_field_is_reachable_from_the_cli():
    base = get_preset("tiny", vocab_size=1000)
    for f in dataclasses.fields(ModelConfig):
        if f.name == "name":
            continue
        value = _other_value(f.name, getattr(base, f.name))
        assert value != getattr(base, f.name), f.name
        cfg = parse("--" + f.name.replace("_", "-"), str(value))
        assert getattr(cfg.model.resolve(1000), f.name) == value, f.name
    # without overrides the preset's values stand, vocabulary from the tokenizer
    assert parse().model.resolve(1000) == base


def test_the_papers_ablations_need_only_flags():
    cfg = parse("--preset", "large", "--rope-theta-global", "160000", "--global-attn-every-n-layers", "1",
                "--vocab-size", "21128", "--no-decay-embeddings")
    model = cfg.model.resolve(21000)
    assert model.global_rope_theta == 160000.0 and model.num_layers == 28
    assert model.layer_types == ["full_attention"] * 28  # all-global attention
    assert model.vocab_size == 21128 and cfg.optimizer.decay_embeddings is False
    assert parse("--global-rope-theta", "160000").model.global_rope_theta == 160000.0  # both spellings


@pytest.mark.parametrize("flags,message", [
    (["--micro-batch-size", "3", "--global-batch-size", "8"], "--global-batch-size 8 must be a multiple of --micro-batch-size 3"),
    (["--lr-warmup-iters", "50"], "lr_warmup_iters must be an integer in [0, train_iters)"),
    (["--normalization", "BatchNorm"], "invalid choice: 'BatchNorm'"),
    (["--lr-decay-style", "step"], "invalid choice: 'step'"),
    (["--finetune"], "--finetune needs --load"),
    (["--mask-prob", "0.95", "--random-prob", "0.1"], "--mask-prob + --random-prob <= 1"),
    (["--log-interval", "0"], "--log-interval must be >= 1"),
    (["--keep-last", "-1"], "--keep-last must be >= 0"),
    (["--seq-length", "ten"], "invalid int value: 'ten'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_validation_errors_are_config_errors(flags, message):
    with pytest.raises(ConfigError) as info:
        parse(*flags)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_required_flags_and_model_limits():
    with pytest.raises(ConfigError, match="required: --tokenizer-model, --data-path, --train-iters"):
        pretrain.parse_args([])
    with pytest.raises(ConfigError, match="smaller than the tokenizer's 1000 tokens"):
        parse("--vocab-size", "999").model.resolve(1000)
    with pytest.raises(ConfigError, match="hidden_size 64 is not divisible by num_attention_heads 5"):
        parse("--num-attention-heads", "5").model.resolve(1000)


def test_flat_args_hold_the_checkpoint_contract_keys():
    flat = parse("--bf16", "--seed", "7").flat()
    for key in ("preset", "seq_length", "data_path", "split", "train_iters", "global_batch_size", "micro_batch_size",
                "tensor_model_parallel_size", "lr", "min_lr", "lr_warmup_iters", "lr_decay_style", "mask_schedule",
                "mask_rate", "mask_rate_min", "mask_rate_max", "masking", "seed", "metrics_file", "tokenizer_model",
                "bf16"):
        assert key in flat, key
    assert flat["bf16"] is True and flat["seed"] == 7 and flat["data_path"] == ["d_text_document"]
    tree = parse().to_dict()
    assert tree["schedule"]["train_iters"] == 50 and tree["data"]["data_path"] == ["d_text_document"]


def test_flags_are_unique_across_the_tree():
    import argparse

    @dataclasses.dataclass
    class Clash:
        data: DataConfig
        seq_length: int = 3

    with pytest.raises(TypeError, match="seq_length appears twice"):
        add_dataclass_args(argparse.ArgumentParser(), Clash)
    assert "preset" in {f.name for f in dataclasses.fields(ModelOverrides)}


def _bash_array(path, name, substitutions):
    text = open(os.path.join(REPO, path), encoding="utf-8").read()
    body = re.search(rf"{name}=\((.*?)\n\)", text, re.S).group(1)
    for var, value in substitutions.items():
        body = body.replace(var, value)
    return shlex.split(body, comments=True)


def test_flags_used_by_the_demo_and_the_readme_still_parse():
    demo = _bash_array("scripts/demo.sh", "PRETRAIN_ARGS", {'"$OUT"': "out", "$OUT": "out"})
    cfg = pretrain.parse_args(demo + ["--exit-interval", "30"])
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.parallel.sequence_parallel
    assert cfg.schedule.train_iters == 60 and cfg.checkpoint.save == "out/checkpoints"
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = readme[readme.index("## Pretraining"):]
    section = section[:section.index("\n## ", 3)]
    flags = shlex.split(re.search(r"FLAGS=\((.*?)\n\)", section, re.S).group(1))
    commands = [shlex.split(line, comments=True) for line in section.splitlines() if "tools/pretrain.py" in line]
    assert len(commands) == 4
    for words in commands:
        argv = words[words.index("tools/pretrain.py") + 1:]
        argv = [w for w in argv if w != "${FLAGS[@]}"]
        cfg = pretrain.parse_args(flags + argv)
        assert cfg.data.data_path == ["0.7", "data/a_text_document", "0.3", "data/b_text_document"]


def test_attention_backend_choices_are_the_dispatchs():
    from megatron_cmbert.kernels.attention import BACKENDS

    parser = pretrain.build_parser()
    action = next(a for a in parser._actions if "--attention-backend" in a.option_strings)
    assert sorted(action.choices) == sorted(["auto", *BACKENDS])


def test_kernel_flags_are_spellings_of_one_choice():
    from megatron_cmbert.kernels.registry import KernelChoice

    resolve = lambda *flags: parse(*flags).model.resolve(1000).kernels
    assert resolve() == KernelChoice()  # the preset's: auto
    assert resolve("--attention-backend", "flex") == KernelChoice(attention="flex")
    assert resolve("--kernel-backend", "triton", "--attention-backend", "flex") == \
        KernelChoice("flex", "triton", "triton", "triton")
    # an op named explicitly wins over a bare backend, in any order
    assert resolve("--attention-backend", "flex", "--kernels", "reference") == KernelChoice.parse("reference,attention=flex")
    assert resolve("--kernel-overrides", "rope=triton") == KernelChoice(rope="triton")


@pytest.mark.parametrize("flags,embedding_decay", [([], 0.1), (["--no-decay-embeddings"], 0.0),
                                                   (["--weight-decay", "0.05"], 0.05)])
def test_weight_decay_flags_reach_the_optimizer(flags, embedding_decay):
    from megatron_cmbert.model import CMBertForMaskedLM
    from megatron_cmbert.training.trainer import build_optimizer

    cfg = parse(*flags)
    model = CMBertForMaskedLM(get_preset("tiny"))
    optimizer = build_optimizer(model, cfg.optimizer, lr=1e-3)
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    param = dict(model.named_parameters())
    assert decay_of[id(param["model.embeddings.tok_embeddings.weight"])] == embedding_decay
    # a linear weight always decays, a norm weight never (ModernBERT's rule)
    assert decay_of[id(param["model.layers.0.attn.Wqkv.weight"])] == cfg.optimizer.weight_decay
    assert decay_of[id(param["model.layers.1.mlp_norm.weight"])] == 0.0
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)
