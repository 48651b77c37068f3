"""One interface over the encoders the evaluation tools compare: our checkpoint (`--load`, any TP size) or a
Hugging Face directory (`--hf`, any ModernBERT or BERT-style encoder, our RMSNorm exports included).

Both kinds give packed outputs: (total_tokens, ...) rows with int32 cu_seqlens, like pretraining. Ours runs
packed varlen (no padding at all); an HF model runs on a right-padded batch whose real rows are packed back,
so tools never see the difference. Autograd flows through both (fine-tuning calls them in train mode).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from megatron_cmbert.model.padding import cu_seqlens_from_lengths
from megatron_cmbert.checkpoint.records import CheckpointError
from megatron_cmbert.errors import UserError
from megatron_cmbert.kernels.registry import KernelChoice, KernelError, add_kernel_args

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EncoderError(UserError, RuntimeError):
    """A one-line reason an encoder cannot be loaded or used, naming the path; tools print `error: ...`."""


@dataclass
class Encoder:
    name: str
    """The --load or --hf path."""
    kind: str
    """"ours" or "hf"."""
    backbone: torch.nn.Module
    """The trainable encoder body (ours: CMBertModel; hf: model.base_model)."""
    mlm: torch.nn.Module | None
    """The whole MLM model (ours: CMBertForMaskedLM; hf: AutoModelForMaskedLM), None without an MLM head."""
    tokenizer: object
    """A transformers PreTrainedTokenizerFast with cls/sep/mask/pad tokens set."""
    hidden_size: int
    max_length: int
    """Ours: the trained --seq-length; hf: max_position_embeddings."""
    device: torch.device
    vocab_size: int = 0
    """Columns of mlm_logits (ours: the unpadded vocabulary, padding columns dropped)."""
    config: object = field(default=None, repr=False)
    """Ours: the ModelConfig; hf: the transformers config (random_init_like rebuilds from it)."""
    uses_token_types: bool = field(default=False, repr=False)
    """HF BERT-style models with segment embeddings get token_type_ids (1 after the first [SEP])."""
    tokenizer_dir: str | None = None
    """The directory holding tokenizer.json (ours: the checkpoint's copy; hf: the model directory)."""

    # ---- tokenizing -------------------------------------------------------------------------------------
    def encode(self, texts: list[str], max_length: int | None = None, pair: list[str] | None = None) -> list[list[int]]:
        """[CLS] text [SEP] (and `pair[i]` [SEP] when given) token ids, truncated to max_length (default:
        the encoder's max_length; pairs are truncated longest-first)."""
        if pair is not None and len(pair) != len(texts):
            raise EncoderError(f"{self.name}: {len(texts)} texts but {len(pair)} pair texts")
        limit = int(max_length or self.max_length)
        out = self.tokenizer(list(texts), list(pair) if pair is not None else None, truncation=True,
                             max_length=limit, add_special_tokens=True, return_attention_mask=False,
                             return_token_type_ids=False)
        return [list(ids) for ids in out["input_ids"]]

    # ---- forward passes -----------------------------------------------------------------------------------
    def hidden_states(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states of every token: packed (total_tokens, hidden) and int32 cu_seqlens."""
        if self.kind == "ours":
            tokens, cu_seqlens, max_seqlen = self._packed(seqs)
            return self.backbone(tokens, cu_seqlens, max_seqlen), cu_seqlens
        ids, mask, types = self._padded(seqs)
        extra = {"token_type_ids": types} if types is not None else {}
        out = self.backbone(input_ids=ids, attention_mask=mask, **extra)
        return out.last_hidden_state[mask.bool()], self._cu(seqs)

    def mlm_logits(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """MLM logits of every token: packed (total_tokens, vocab_size) and int32 cu_seqlens."""
        if self.mlm is None:
            raise EncoderError(f"{self.name}: this model has no MLM head (load one saved with its head)")
        if self.kind == "ours":
            tokens, cu_seqlens, max_seqlen = self._packed(seqs)
            return self.mlm(tokens, cu_seqlens, max_seqlen).logits[:, :self.vocab_size], cu_seqlens
        ids, mask, types = self._padded(seqs)
        extra = {"token_type_ids": types} if types is not None else {}
        logits = self.mlm(input_ids=ids, attention_mask=mask, **extra).logits
        return logits[mask.bool()][:, :self.vocab_size], self._cu(seqs)

    # ---- batching helpers --------------------------------------------------------------------------------
    def _cu(self, seqs) -> torch.Tensor:
        return cu_seqlens_from_lengths([len(s) for s in seqs], device=self.device)

    def _packed(self, seqs):
        if not seqs or any(len(s) == 0 for s in seqs):
            raise EncoderError(f"{self.name}: empty batch or empty sequence")
        tokens = torch.tensor([t for s in seqs for t in s], dtype=torch.long, device=self.device)
        return tokens, self._cu(seqs), max(len(s) for s in seqs)

    def _padded(self, seqs):
        if not seqs or any(len(s) == 0 for s in seqs):
            raise EncoderError(f"{self.name}: empty batch or empty sequence")
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        types = torch.zeros((len(seqs), width), dtype=torch.long) if self.uses_token_types else None
        sep = self.tokenizer.sep_token_id
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
            if types is not None and sep in s:
                # BERT's segments: everything after the first [SEP] is sentence B
                types[i, s.index(sep) + 1:len(s)] = 1
        to = lambda t: None if t is None else t.to(self.device)
        return to(ids), to(mask), to(types)

    def require_tokens(self, *names: str) -> None:
        """EncoderError unless the tokenizer defines these special tokens (e.g. "mask_token"): some HF
        encoders (decoder-based embedders) have no [CLS] or [MASK], which only some uses need."""
        missing = [n for n in names if getattr(self.tokenizer, n, None) is None]
        if missing:
            raise EncoderError(f"{self.name}: the tokenizer defines no {', '.join(missing)}")

    def length_limit(self) -> int | None:
        """The longest input the model can take at all: max_position_embeddings for learned absolute
        positions (BERT/RoBERTa), None for rotary or ALiBi models (ours runs past its trained length)."""
        if self.kind == "ours":
            return None
        for name, module in self.backbone.named_modules():
            if name.endswith("position_embeddings") and isinstance(module, torch.nn.Embedding):
                return int(module.num_embeddings)
        return None

    def eval(self) -> "Encoder":
        for m in (self.backbone, self.mlm):
            if m is not None:
                m.eval()
        return self

    def train(self, mode: bool = True) -> "Encoder":
        for m in (self.backbone, self.mlm):
            if m is not None:
                m.train(mode)
        return self

    def parameters(self):
        """The trainable parameters (the MLM model's when there is one: it contains the backbone)."""
        return (self.mlm if self.mlm is not None else self.backbone).parameters()


# ---- loading --------------------------------------------------------------------------------------------
def wrap_tokenizer(tokenizer_dir: str, max_length: int):
    """Our tokenizer.json as a transformers PreTrainedTokenizerFast with its special tokens named."""
    from transformers import PreTrainedTokenizerFast

    from megatron_cmbert.data.tokenizer import SPECIAL_TOKENS, load_tokenizer

    try:
        tok = load_tokenizer(tokenizer_dir)  # checks the fixed special ids
    except (OSError, ValueError) as exc:
        raise EncoderError(str(exc)) from exc
    pad, unk, cls, sep, mask = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, unk_token=unk, cls_token=cls,
                                   sep_token=sep, mask_token=mask, model_max_length=max_length,
                                   clean_up_tokenization_spaces=False)


def ours_encoder(model, name: str, tokenizer, tokenizer_dir: str | None, max_length: int, device,
                 dtype) -> Encoder:
    """An Encoder around one of our CMBertForMaskedLM models (moved to device/dtype, in eval mode; its
    kernels are the ones it was built with)."""
    model.to(device=device, dtype=dtype).eval()
    config = model.config
    return Encoder(name=name, kind="ours", backbone=model.model, mlm=model, tokenizer=tokenizer,
                   hidden_size=config.hidden_size, max_length=max_length, device=torch.device(device),
                   vocab_size=config.vocab_size, config=config, tokenizer_dir=tokenizer_dir)


def resolve_kernels(kernels, device, dtype) -> KernelChoice:
    """The kernels an evaluation runs with: `kernels` as named (default auto, which CMBERT_KERNEL_BACKEND
    replaces), resolved for the device and dtype, whatever the checkpoint trained with (that was another
    machine's choice). A backend that cannot run there is an EncoderError naming it."""
    try:
        return KernelChoice.parse(kernels).resolved(torch.device(device), dtype)
    except KernelError as exc:
        raise EncoderError(f"--kernels: {exc}") from exc


def _load_ours(load: str, device, dtype, kernels) -> Encoder:
    from megatron_cmbert.checkpoint.reader import build_model, read_checkpoint

    choice = resolve_kernels(kernels, device, dtype)
    try:
        ck = read_checkpoint(load)
    except CheckpointError as exc:
        raise EncoderError(str(exc)) from exc
    return ours_encoder(build_model(ck.config, ck.state_dict, kernels=choice), load,
                        wrap_tokenizer(ck.tokenizer_dir, ck.seq_length), ck.tokenizer_dir, ck.seq_length, device, dtype)


def _hf_kwargs(path: str, dtype, attn_implementation) -> dict:
    from megatron_cmbert.hf.common import load_kwargs

    kwargs = load_kwargs(dtype, remote_code=True)  # our RMSNorm exports ship their model as remote code
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation  # e.g. eager, sdpa, flash_attention_2
    return kwargs


def _load_hf(path: str, device, dtype, attn_implementation) -> Encoder:
    import transformers

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise EncoderError(f"{os.path.join(path, 'config.json')}: missing (--hf wants a Hugging Face model directory)")
    kwargs = _hf_kwargs(path, dtype, attn_implementation)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    except Exception as exc:  # transformers raises many types; name the directory
        raise EncoderError(f"{path}: cannot load its tokenizer ({_one_line(exc)})") from exc
    mlm = None
    try:
        mlm = transformers.AutoModelForMaskedLM.from_pretrained(path, **kwargs)
        backbone = mlm.base_model
    except Exception:  # no MLM head (e.g. an encoder-only or sentence-embedding export): the body alone
        try:
            backbone = transformers.AutoModel.from_pretrained(path, **kwargs)
        except Exception as exc:
            raise EncoderError(f"{path}: cannot load the model ({_one_line(exc)})") from exc
    encoder = _hf_encoder(path, tokenizer, backbone, mlm, device, dtype)
    encoder.tokenizer_dir = path
    return encoder


def _hf_encoder(path, tokenizer, backbone, mlm, device, dtype) -> Encoder:
    for model in (mlm, backbone):
        if model is not None:
            model.to(device=device, dtype=dtype).eval()
    config = (mlm or backbone).config
    max_length = int(getattr(config, "max_position_embeddings", 0) or tokenizer.model_max_length)
    vocab = len(tokenizer) if mlm is None else int(mlm.config.vocab_size)
    return Encoder(name=path, kind="hf", backbone=backbone, mlm=mlm, tokenizer=tokenizer,
                   hidden_size=int(config.hidden_size), max_length=max_length, device=torch.device(device),
                   vocab_size=vocab, config=config, uses_token_types=int(getattr(config, "type_vocab_size", 0) or 0) > 1)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_encoder(load: str | None = None, hf: str | None = None, *, device="cpu", dtype=torch.float32,
                 kernels=None, hf_attn_implementation: str | None = None) -> Encoder:
    """Exactly one of `load` (our checkpoint: iter_N or save directory) and `hf` (an HF model directory).
    `kernels`: ours, a KernelChoice or its text (default auto, resolved for the device); `hf_attn_implementation`:
    hf, e.g. eager, sdpa, flash_attention_2 (default: transformers' choice)."""
    if (load is None) == (hf is None):
        raise EncoderError("give exactly one of --load CKPT and --hf DIR")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise EncoderError(f"--dtype {dtype}: choose from {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if load is not None:
        return _load_ours(load, device, dtype, kernels)
    return _load_hf(hf, device, dtype, hf_attn_implementation)


def kernels_ran(encoder: Encoder) -> str | None:
    """The kernels our model runs, one name per op (None for an HF model: transformers chose them)."""
    return str(encoder.mlm.kernels.choice) if encoder.kind == "ours" else None


def random_init_like(encoder: Encoder, seed: int) -> Encoder:
    """The same architecture and tokenizer, freshly initialised under `seed` (the from-scratch baseline)."""
    device = encoder.device
    dtype = next(encoder.backbone.parameters()).dtype
    torch.manual_seed(seed)
    if encoder.kind == "ours":
        from megatron_cmbert.model import CMBertForMaskedLM

        config = encoder.config.replace(kernels=encoder.mlm.kernels.choice)  # the same kernels
        return ours_encoder(CMBertForMaskedLM(config), f"{encoder.name} (random init, seed {seed})",
                            encoder.tokenizer, encoder.tokenizer_dir, encoder.max_length, device, dtype)
    import transformers

    kwargs = {"trust_remote_code": True}
    if encoder.mlm is not None:
        mlm = transformers.AutoModelForMaskedLM.from_config(encoder.config, **kwargs)
        backbone = mlm.base_model
    else:
        mlm, backbone = None, transformers.AutoModel.from_config(encoder.config, **kwargs)
    out = _hf_encoder(encoder.name, encoder.tokenizer, backbone, mlm, device, dtype)
    out.name, out.tokenizer_dir = f"{encoder.name} (random init, seed {seed})", encoder.tokenizer_dir
    return out


# ---- command line ----------------------------------------------------------------------------------------
def add_encoder_args(parser) -> None:
    """--load CKPT | --hf DIR (exactly one), --device, --dtype, --kernels (ours), --hf-attn-implementation."""
    group = parser.add_argument_group("encoder (exactly one of --load / --hf)")
    which = group.add_mutually_exclusive_group(required=True)
    which.add_argument("--load", metavar="CKPT", help="our checkpoint: a save directory (its newest complete "
                       "checkpoint) or one iter_N directory; any tensor-parallel size")
    which.add_argument("--hf", metavar="DIR", help="a Hugging Face model directory: any ModernBERT or BERT-style "
                       "encoder, e.g. an export of tools/convert_to_hf.py (remote code is trusted)")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="torch device (default: cuda when available, else cpu)")
    group.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                       help="weights and activations (default: bfloat16 on GPU, float32 on CPU)")
    add_kernel_args(group)
    group.add_argument("--hf-attn-implementation", default=None, metavar="NAME",
                       help="--hf: transformers' attn_implementation, e.g. eager, sdpa, flash_attention_2 "
                            "(default: transformers' choice)")


def default_dtype(device) -> str:
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"


def encoder_from_args(args) -> Encoder:
    dtype = args.dtype or default_dtype(args.device)
    return load_encoder(args.load, args.hf, device=args.device, dtype=dtype, kernels=args.kernels,
                        hf_attn_implementation=args.hf_attn_implementation)
