"""tools/convert_to_hf.py and tools/convert_from_hf.py on tiny models trained a few steps by tools/pretrain.py
(RMSNorm: remote code; LayerNorm: the stock class). The reference every time is our own model filled by the
training code's load_checkpoint (not the converter's reader), run packed; the exports run padded through
transformers, sentence-transformers and onnxruntime."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tools import convert_from_hf, convert_to_hf

transformers = pytest.importorskip("transformers", reason="needs the optional package transformers (extra hf)")
from megatron_cmbert.data.tokenizer import MASK_ID, load_tokenizer  # noqa: E402
from megatron_cmbert.parallel.world import single_process_group  # noqa: E402
from megatron_cmbert.model import CMBertForMaskedLM, ModelConfig  # noqa: E402
from megatron_cmbert.model.padding import run_padded  # noqa: E402
from megatron_cmbert.checkpoint.store import load_checkpoint  # noqa: E402
from megatron_cmbert.parallel.world import Ranks  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 240
SEQ = 64
TEXTS = ["中国的首都是北京，北京有很多名胜古迹。", "今天下午我们去公园散步。", "科学家发现了一种新的治疗方法，可以帮助更多的病人恢复健康。"]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _pretrain(root, tokenizer_dir, data, name, extra=()):
    args = ["--preset", "tiny", "--tokenizer-model", tokenizer_dir, "--data-path", data,
            "--split", "90,10,0", "--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "4",
            "--train-iters", "3", "--lr-warmup-iters", "1", "--lr", "3e-3", "--log-interval", "1", "--seed", "3",
            "--eval-interval", "3", "--eval-iters", "1", "--save", str(root / name),
            "--metrics-file", str(root / f"{name}.jsonl"), *extra]
    res = subprocess.run([sys.executable, os.path.join(REPO, "tools", "pretrain.py"), *args], capture_output=True,
                         text=True, timeout=TIMEOUT, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return root / name


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_dir, news_prefix):
    """Two tiny models (RMSNorm, LayerNorm), each trained 3 steps and exported once."""
    root = tmp_path_factory.mktemp("convert_hf")
    out = {"root": root, "data": news_prefix}
    for norm in ("RMSNorm", "LayerNorm"):
        ckpt = _pretrain(root, tokenizer_dir, news_prefix, f"ckpt_{norm}", ["--normalization", norm])
        hf_dir = root / f"hf_{norm}"
        # ONNX for the remote-code model only (the harder graph; the stock one differs only in its norms)
        options = ["--sentence-transformers"] + (["--onnx"] if norm == "RMSNorm" else [])
        assert convert_to_hf.main(["--load", str(ckpt), "--output", str(hf_dir), *options]) == 0
        out[norm] = (ckpt, hf_dir)
    return out


def reference(ckpt):
    """Our model filled by the training code's loader (TorchSpec, reference attention)."""
    path = ckpt / sorted(p for p in os.listdir(ckpt) if p.startswith("iter_"))[-1]
    meta = json.load(open(path / "config.json"))
    model = CMBertForMaskedLM(ModelConfig.from_dict(meta["model"]).replace(kernels="reference")).eval()
    with single_process_group():
        load_checkpoint(str(path), model, None, Ranks(0, 1, 0, 0, 1))
    return model


def padded(hf_dir, texts=TEXTS):
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    batch = tok(texts, padding=True, return_tensors="pt")
    assert batch["input_ids"][:, 0].eq(2).all()  # [CLS] added by the tokenizer
    return batch["input_ids"], batch["attention_mask"]


def dtype_kwargs():
    from megatron_cmbert.hf.export import load_kwargs
    return {k: v for k, v in load_kwargs().items() if k != "trust_remote_code"}


def test_stock_layernorm_export_loads_without_remote_code(trained):
    ckpt, hf_dir = trained["LayerNorm"]
    files = set(os.listdir(hf_dir))
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl", ".py")) for f in files)
    config = json.load(open(hf_dir / "config.json"))
    assert config["model_type"] == "modernbert" and "auto_map" not in config
    vocab = load_tokenizer(str(hf_dir)).get_vocab_size()
    # the trained length, the unpadded vocabulary, both RoPE spellings, the tokenizer's special ids
    assert config["max_position_embeddings"] == SEQ and config["vocab_size"] == vocab
    assert config["global_rope_theta"] == 80_000 and config["rope_parameters"]["full_attention"]["rope_theta"] == 80_000
    assert config["local_rope_theta"] == 10_000 and config["local_attention"] == 8
    assert (config["pad_token_id"], config["cls_token_id"], config["sep_token_id"]) == (0, 2, 3)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(str(hf_dir), **dtype_kwargs()).eval()
    assert type(hf) is transformers.ModernBertForMaskedLM
    assert hf.model.embeddings.tok_embeddings.weight.shape[0] == vocab
    ids, mask = padded(hf_dir)
    ours = reference(ckpt)
    with torch.no_grad():
        expected = run_padded(lambda *packed: ours(*packed).logits, ids, mask)[..., :vocab]
        got = hf(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max().item() < 1e-4


def test_remote_code_export_and_its_auto_classes(trained):
    ckpt, hf_dir = trained["RMSNorm"]
    config = json.load(open(hf_dir / "config.json"))
    assert set(config["auto_map"]) >= {"AutoModel", "AutoModelForMaskedLM", "AutoModelForSequenceClassification"}
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModelForMaskedLM.from_pretrained(str(hf_dir))
    encoder = transformers.AutoModel.from_pretrained(str(hf_dir), trust_remote_code=True, **dtype_kwargs()).eval()
    assert type(encoder).__name__ == "CMBertModel"
    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(type(m).__name__ == "ModernBertRMSNorm" for m in norms)
    ids, mask = padded(hf_dir)
    ours = reference(ckpt)
    with torch.no_grad():
        expected = run_padded(ours.model, ids, mask)
        got = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max().item() < 1e-5
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(hf_dir), trust_remote_code=True, num_labels=3, **dtype_kwargs())
    torch.testing.assert_close(classifier.model.final_norm.weight, ours.model.final_norm.weight)
    assert classifier(input_ids=ids, attention_mask=mask).logits.shape == (len(TEXTS), 3)


@pytest.mark.parametrize("norm", ["RMSNorm", "LayerNorm"])
def test_fill_mask_pipeline(trained, norm):
    ckpt, hf_dir = trained[norm]
    fill = transformers.pipeline("fill-mask", model=str(hf_dir), trust_remote_code=norm == "RMSNorm", device="cpu")
    top = fill("北京是中国的[MASK]都。", top_k=3)
    assert len(top) == 3 and all(isinstance(r["token_str"], str) for r in top)
    # the pipeline's top score is our model's softmax at the [MASK] position
    ids = torch.tensor(load_tokenizer(str(hf_dir)).encode("北京是中国的[MASK]都。").ids)
    position = int((ids == MASK_ID).nonzero())
    ours = reference(ckpt)
    with torch.no_grad():
        probs = ours(ids, torch.tensor([0, len(ids)], dtype=torch.int32), len(ids)).logits[position].softmax(-1)
    assert top[0]["token"] == int(probs.argmax()) and abs(top[0]["score"] - probs.max().item()) < 1e-5


@pytest.mark.parametrize("norm", ["RMSNorm", "LayerNorm"])
def test_sentence_transformers_embeddings_equal_mean_pooling_ours(trained, norm):
    sentence_transformers = pytest.importorskip("sentence_transformers", reason="needs sentence-transformers")
    ckpt, hf_dir = trained[norm]
    model = sentence_transformers.SentenceTransformer(str(hf_dir), device="cpu", trust_remote_code=norm == "RMSNorm")
    got = torch.as_tensor(model.encode(TEXTS))
    ids, mask = padded(hf_dir)
    ours = reference(ckpt)
    with torch.no_grad():
        hidden = run_padded(ours.model, ids, mask)
    mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    expected = mean / mean.norm(dim=-1, keepdim=True)
    assert (got - expected).abs().max().item() < 1e-5


def test_onnx_graph_equals_pytorch(trained):
    onnxruntime = pytest.importorskip("onnxruntime", reason="needs onnxruntime")
    ckpt, hf_dir = trained["RMSNorm"]
    session = onnxruntime.InferenceSession(str(hf_dir / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids, mask = padded(hf_dir, TEXTS + ["一" * 40])  # a fresh batch and length, longer than the window
    got = torch.as_tensor(session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0])
    ours = reference(ckpt)
    with torch.no_grad():
        expected = run_padded(ours.model, ids, mask)
    real = mask.bool()
    assert got.shape == (*ids.shape, 64) and (got[real] - expected[real]).abs().max().item() < 1e-4


def _iter_dir(ckpt):
    return ckpt / sorted(p for p in os.listdir(ckpt) if p.startswith("iter_"))[-1]


def test_round_trip_is_bitwise_at_tp1(trained):
    ckpt, hf_dir = trained["RMSNorm"]
    back = trained["root"] / "back_tp1"
    assert convert_from_hf.main(["--hf", str(hf_dir), "--save", str(back)]) == 0
    assert (back / "iter_0000000" / "tokenizer" / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    original, again = reference(ckpt).state_dict(), reference(back).state_dict()
    vocab = original["decoder_bias"].shape[0] and load_tokenizer(str(hf_dir)).get_vocab_size()
    assert original.keys() == again.keys()
    for key, value in original.items():
        rows = vocab if key in ("decoder_bias", "model.embeddings.tok_embeddings.weight") else None
        assert torch.equal(again[key][:rows], value[:rows]), key  # padding rows of the vocabulary: zeros


# Run by torchrun on 2 ranks: (1) load the TP=1 checkpoint at TP=2 and save it again as a TP=2 checkpoint;
# (2) load the TP=2 round-trip checkpoint at TP=2 and compare every shard bitwise with (1)'s.
TP2_SCRIPT = r'''
import json, os, sys, torch, torch.distributed as dist
from megatron.core import parallel_state
from megatron_cmbert.model import ModelConfig
from megatron_cmbert.parallel import cpu_shim
from megatron_cmbert.parallel.layer_spec import build_masked_lm
from megatron_cmbert.checkpoint.records import TrainState
from megatron_cmbert.checkpoint.store import load_checkpoint, read_run_record, save_checkpoint
from megatron_cmbert.parallel.world import Ranks


def main(src, dst, round_trip, result):
    dist.init_process_group("gloo")
    cpu_shim.install()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    rank = dist.get_rank()
    ranks = Ranks(rank, 2, 0, rank, 2)
    record = read_run_record(src)
    config = record.model
    model, other = build_masked_lm(config), build_masked_lm(config)
    load_checkpoint(src, model, None, ranks)
    save_checkpoint(dst, 3, model, None, ranks, TrainState(step=3), record,
                    tokenizer_dir=os.path.join(src, "tokenizer"))
    load_checkpoint(round_trip, other, None, ranks)
    rows = config.padded_vocab_size(2) // 2
    real = torch.arange(rank * rows, (rank + 1) * rows) < config.vocab_size  # this rank's unpadded vocabulary
    vocab_sharded = ("model.embeddings.tok_embeddings.weight", "decoder_bias")
    mismatch = [n for (n, a), (_, b) in zip(model.named_parameters(), other.named_parameters())
                if not (torch.equal(a[real], b[real]) if n in vocab_sharded else torch.equal(a, b))]
    with open(f"{result}.{rank}", "w") as fh:
        json.dump({"mismatch": mismatch, "params": len(list(model.parameters()))}, fh)
    dist.destroy_process_group()


if __name__ == "__main__":  # the checkpoint writer starts helper processes that re-import this file
    main(*sys.argv[1:5])
'''


def test_tp2_round_trip_and_tp2_checkpoint_exports_the_same_files(trained):
    root = trained["root"]
    ckpt, hf_dir = trained["RMSNorm"]
    round_trip = root / "back_tp2"
    assert convert_from_hf.main(["--hf", str(hf_dir), "--save", str(round_trip), "--tensor-model-parallel-size", "2"]) == 0
    script = root / "tp2_resave.py"
    script.write_text(TP2_SCRIPT)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(_iter_dir(ckpt)), str(root / "ckpt_tp2"), str(_iter_dir(round_trip)),
                          str(root / "tp2_result")], capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    for rank in (0, 1):
        result = json.load(open(f"{root / 'tp2_result'}.{rank}"))
        assert result["params"] > 10 and result["mismatch"] == [], result
    tp2_hf = root / "hf_from_tp2"
    assert convert_to_hf.main(["--load", str(root / "ckpt_tp2"), "--output", str(tp2_hf)]) == 0
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "modeling_cmbert.py"):
        assert (tp2_hf / name).read_bytes() == (hf_dir / name).read_bytes(), name


def test_finetune_continues_from_a_converted_checkpoint(trained, tokenizer_dir):
    root = trained["root"]
    ckpt, hf_dir = trained["LayerNorm"]
    back = root / "back_ln"
    assert convert_from_hf.main(["--hf", str(hf_dir), "--save", str(back)]) == 0
    args = ["--preset", "tiny", "--normalization", "LayerNorm", "--tokenizer-model", tokenizer_dir,
            "--data-path", trained["data"], "--split", "90,10,0", "--seq-length", str(SEQ),
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2", "--lr-warmup-iters", "1",
            "--lr", "1e-3", "--log-interval", "1", "--load", str(back), "--finetune"]
    res = subprocess.run([sys.executable, os.path.join(REPO, "tools", "pretrain.py"), *args], capture_output=True,
                         text=True, timeout=TIMEOUT, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0 and "--finetune" in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]


def test_bfloat16_export(trained):
    ckpt, _ = trained["LayerNorm"]
    out = trained["root"] / "hf_bf16"
    assert convert_to_hf.main(["--load", str(ckpt), "--output", str(out), "--dtype", "bfloat16"]) == 0
    from safetensors.torch import load_file
    weights = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    expected = reference(ckpt).state_dict()["model.layers.1.attn.Wo.weight"].to(torch.bfloat16)
    assert torch.equal(weights["model.layers.1.attn.Wo.weight"], expected)


def test_bad_checkpoints_give_one_line_naming_the_file(trained, tmp_path, capsys):
    ckpt, _ = trained["RMSNorm"]
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    shard = sorted((_iter_dir(broken)).glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    assert convert_to_hf.main(["--load", str(broken), "--output", str(tmp_path / "out")]) == 2  # a user error
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and shard.name in err and "truncated" in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    (_iter_dir(broken) / "config.json").unlink()
    shutil.copyfile(_iter_dir(ckpt) / shard.name, shard)
    assert convert_to_hf.main(["--load", str(broken), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.json" in err, err
    assert convert_to_hf.main(["--load", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_failed_parity_check_writes_nothing(trained, tmp_path, monkeypatch, capsys):
    from megatron_cmbert.model import hf_keymap

    ckpt, _ = trained["LayerNorm"]
    # The classic conversion bug: Wqkv left in our per-head layout. Same shapes, so loading cannot notice.
    monkeypatch.setattr(hf_keymap, "qkv_to_hf", lambda weight, num_heads: weight)
    assert convert_to_hf.main(["--load", str(ckpt), "--output", str(tmp_path / "out")]) == 1  # a failed check
    assert "largest logit difference" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_model_card_states_what_the_run_recorded(trained):
    """The card against the run's own metrics file and flags: steps, tokens, length, data, losses."""
    ckpt, hf_dir = trained["RMSNorm"]
    card = (hf_dir / "README.md").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in open(trained["root"] / "ckpt_RMSNorm.jsonl")]
    train = [r for r in rows if "loss" in r][-1]
    valid = [r for r in rows if "valid_loss" in r][-1]
    assert train["step"] == 3
    assert "| steps | 3 |" in card and f"| trained sequence length | {SEQ} " in card
    assert f"| final train loss | {train['loss']:.4f} |" in card
    assert f"| final valid loss | {valid['valid_loss']:.4f} |" in card
    assert f"`{trained['data']}` (weight 1)" in card
    assert "dynamic rate 0.15 -> 0.3 during the LR warmup, then back to 0.15" in card
    assert "| samples seen | 12 |" in card  # 3 steps x global batch 4
    assert "trust_remote_code=True" in card and "tiny preset" in card
