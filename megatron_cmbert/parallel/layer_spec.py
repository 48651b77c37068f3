"""The one place that decides which classes fill the model's slots (linears, embedding, norms) and which
collectives move tokens and vocabulary slices between tensor-parallel ranks.

    build_layer_spec(transformer_impl="local", sequence_parallel=False)
        - no megatron-core model parallelism initialised  -> TorchSpec (plain PyTorch, single process)
        - "local"              -> megatron-core ColumnParallelLinear / RowParallelLinear / VocabParallelEmbedding
        - "transformer_engine" -> TE linears (needs transformer_engine to import), same embedding
    build_masked_lm(config, ...) builds CMBertForMaskedLM with that spec.

Data flow under tensor parallelism (T tokens, TP ranks; with sequence parallelism "token shard" = T/TP rows):
  embedding: vocab-parallel lookup, all-reduce (or reduce-scatter to token shards under SP)
  Wqkv, Wi: column-parallel (all-gather token shards under SP) -> attention on local heads over all tokens
  Wo:       row-parallel (all-reduce, or reduce-scatter to token shards under SP)
  head:     tokens gathered, then replicated dense/norm on every rank; decoder = vocab-parallel logits
  norms on token shards: their weight grads are partial under SP and must be summed over TP by
  parallel.sharding.allreduce_sequence_parallel_grads(model) after backward.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from megatron_cmbert.model.layers import NORM_CLASSES, TorchSpec

TRANSFORMER_IMPLS = ("local", "transformer_engine")


def _megatron():
    from megatron.core import parallel_state, tensor_parallel

    from megatron_cmbert.parallel import cpu_shim

    cpu_shim.install()
    return parallel_state, tensor_parallel


class MegatronSpec:
    """megatron-core tensor parallelism (needs parallel_state.initialize_model_parallel first)."""

    def __init__(self, sequence_parallel: bool = False, transformer_impl: str = "local"):
        parallel_state, tensor_parallel = _megatron()
        from megatron.core import ModelParallelConfig

        self.tp = tensor_parallel
        self.group = parallel_state.get_tensor_model_parallel_group()
        self.tensor_parallel_size = parallel_state.get_tensor_model_parallel_world_size()
        self.tensor_parallel_rank = parallel_state.get_tensor_model_parallel_rank()
        # Sequence parallelism only means something with TP > 1 (megatron-core turns it off otherwise).
        self.sequence_parallel = bool(sequence_parallel) and self.tensor_parallel_size > 1
        self.transformer_impl = transformer_impl
        # CPU initialisation builds each full weight from the default generator and keeps this rank's slice,
        # so a model seeded the same way is the same logical model at every TP size.
        self.config = ModelParallelConfig(
            tensor_model_parallel_size=self.tensor_parallel_size, sequence_parallel=self.sequence_parallel,
            use_cpu_initialization=True, perform_initialization=True, params_dtype=torch.float32,
            gradient_accumulation_fusion=False)
        if transformer_impl == "transformer_engine":
            self._column_cls, self._row_cls = _transformer_engine_linears()
        else:
            self._column_cls, self._row_cls = _local_linears()

    def embedding(self, num_embeddings, embedding_dim, init_method):
        return _vocab_embedding_class()(num_embeddings, embedding_dim, init_method=init_method,
                                        config=self.config, reduce_scatter_embeddings=self.sequence_parallel,
                                        tp_group=self.group)

    def column_linear(self, in_features, out_features, init_method):
        return self._column_cls(in_features, out_features, config=self.config, init_method=init_method,
                                gather_output=False, bias=False, skip_bias_add=False, is_expert=False,
                                tp_group=self.group)

    def row_linear(self, in_features, out_features, init_method):
        return self._row_cls(in_features, out_features, config=self.config, init_method=init_method,
                             bias=False, input_is_parallel=True, skip_bias_add=False, is_expert=False,
                             tp_group=self.group)

    def norm(self, normalization, hidden_size, eps, on_token_shards: bool):
        module = NORM_CLASSES[normalization](hidden_size, eps)
        # Marked weights get their partial grads summed over TP (parallel.sharding); megatron uses the
        # same attribute name.
        module.weight.sequence_parallel = self.sequence_parallel and on_token_shards
        return module

    def vocab_bias(self, padded_vocab_size):
        bias = nn.Parameter(torch.zeros(padded_vocab_size // self.tensor_parallel_size))
        self.tp.set_tensor_model_parallel_attributes(bias, is_parallel=True, dim=0, stride=1)
        return bias

    def vocab_range(self, padded_vocab_size):
        per_rank = padded_vocab_size // self.tensor_parallel_size
        return per_rank * self.tensor_parallel_rank, per_rank * (self.tensor_parallel_rank + 1)

    def gather_tokens(self, x):
        if not self.sequence_parallel:
            return x
        # The head after this point runs replicated and all-reduces its input grad (lm_logits), so the
        # backward of this gather only has to keep this rank's slice.
        return self.tp.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False,
                                                            group=self.group)

    def lm_logits(self, x, weight, bias, vocab_size: int):
        """This rank's vocabulary slice of the logits. The slices must stay equal for the vocab-parallel
        cross-entropy, so the padding ids (>= vocab_size, on the last ranks) are masked to -inf instead of
        cut off."""
        logits = F.linear(self.tp.copy_to_tensor_model_parallel_region(x, group=self.group), weight, bias)
        start, end = self.vocab_range(weight.shape[0] * self.tensor_parallel_size)
        if end > vocab_size:
            padding = torch.arange(start, end, device=logits.device) >= vocab_size
            logits = logits.masked_fill(padding, float("-inf"))
        return logits

    def cross_entropy(self, logits, targets):
        # megatron's vocab-parallel CE edits fp32 logits in place: give it its own fp32 copy (a bf16 logit's
        # .float() is one; an fp32 one is cloned), so the logits the model returns stay as computed.
        logits = logits.clone() if logits.dtype == torch.float32 else logits.float()
        return self.tp.vocab_parallel_cross_entropy(logits, targets)

    def argmax(self, logits):
        """Global id of each row's largest logit: the best of every rank's slice (one all-gather of the
        per-rank maxima and their ids over the TP group)."""
        import torch.distributed as dist

        values, index = logits.max(dim=-1)
        index = index + self.vocab_range(logits.shape[-1] * self.tensor_parallel_size)[0]
        if self.tensor_parallel_size == 1:
            return index
        pair = torch.stack([values.float(), index.float()])  # ids < 2^24 are exact in fp32
        gathered = [torch.empty_like(pair) for _ in range(self.tensor_parallel_size)]
        dist.all_gather(gathered, pair.contiguous(), group=self.group)
        stacked = torch.stack(gathered)  # (tp, 2, rows)
        best = stacked[:, 0].argmax(dim=0)
        return stacked[:, 1].gather(0, best[None]).squeeze(0).long()


def _seq_first(layer_forward):
    """megatron-core layers take [seq, batch, hidden]; the model passes packed [tokens, hidden]."""

    def forward(self, x):
        output = layer_forward(self, x.unsqueeze(1))
        return (output[0] if isinstance(output, tuple) else output).squeeze(1)

    return forward


def _cpu_autocast(forward_impl):
    """Make megatron's linear autograd Function see one dtype in forward and backward under CPU autocast.

    megatron-core wraps that Function in custom_fwd/custom_bwd for *CUDA* autocast: on a GPU its backward
    re-enters autocast with the forward's dtype. Under CPU autocast nothing does, so the forward's matmul
    runs in bf16 while the backward multiplies the bf16 output grad by the saved fp32 weight and fails
    ("expected m1 and m2 to have the same dtype"). Here the input and weight are cast to the autocast dtype
    before the Function (differentiable casts), with autocast off inside it: forward and backward both
    compute in bf16, and the casts' backward hands fp32 grads to the fp32 master weights, which is what
    the autograd engine does on a GPU. CUDA tensors, and CPU runs without autocast, take the stock path.
    """

    def _forward_impl(self, input, weight, *args, **kwargs):
        if kwargs.get("tp_group", 0) is None:  # RowParallelLinear passes None: megatron then warns every call
            kwargs["tp_group"] = self.tp_group  # (a warnings.warn that torch.compile cannot trace)
        if input.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
            return forward_impl(self, input, weight, *args, **kwargs)
        dtype = torch.get_autocast_dtype("cpu")
        with torch.autocast("cpu", enabled=False):
            return forward_impl(self, input.to(dtype), weight.to(dtype), *args, **kwargs)

    return _forward_impl


@functools.cache
def _local_linears():
    _, tensor_parallel = _megatron()

    class LocalColumnLinear(tensor_parallel.ColumnParallelLinear):
        forward = _seq_first(tensor_parallel.ColumnParallelLinear.forward)
        _forward_impl = _cpu_autocast(tensor_parallel.ColumnParallelLinear._forward_impl)

    class LocalRowLinear(tensor_parallel.RowParallelLinear):
        forward = _seq_first(tensor_parallel.RowParallelLinear.forward)
        _forward_impl = _cpu_autocast(tensor_parallel.RowParallelLinear._forward_impl)

    return LocalColumnLinear, LocalRowLinear


@functools.cache
def _transformer_engine_linears():
    try:
        import transformer_engine  # noqa: F401  (megatron imports TE softly; fail here with a clear message)
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear
    except ImportError as error:
        raise ImportError("--transformer-impl transformer_engine needs Transformer Engine "
                          f"(pip install transformer-engine): {error}") from error

    class TEColumnLinear(TEColumnParallelLinear):
        forward = _seq_first(TEColumnParallelLinear.forward)

    class TERowLinear(TERowParallelLinear):
        forward = _seq_first(TERowParallelLinear.forward)

    return TEColumnLinear, TERowLinear


@functools.cache
def _vocab_embedding_class():
    _, tensor_parallel = _megatron()

    class VocabEmbedding(tensor_parallel.VocabParallelEmbedding):
        def forward(self, ids):
            # [tokens] -> [1, tokens] (megatron's [b, s]) -> [tokens, 1, H] or its token shard -> 2-D
            out = super().forward(ids.unsqueeze(0))
            return out.squeeze(1) if self.reduce_scatter_embeddings else out.squeeze(0)

    return VocabEmbedding


def build_layer_spec(transformer_impl: str = "local", sequence_parallel: bool = False):
    """TorchSpec when megatron-core model parallelism is not initialised, else a MegatronSpec."""
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"transformer_impl must be one of {TRANSFORMER_IMPLS}, got {transformer_impl!r}")
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        if sequence_parallel or transformer_impl != "local":
            raise RuntimeError("sequence parallelism / Transformer Engine need "
                               "parallel_state.initialize_model_parallel() first")
        return TorchSpec()
    return MegatronSpec(sequence_parallel=sequence_parallel, transformer_impl=transformer_impl)


def build_masked_lm(config, transformer_impl: str = "local", sequence_parallel: bool = False):
    from megatron_cmbert.model import CMBertForMaskedLM

    return CMBertForMaskedLM(config, build_layer_spec(transformer_impl, sequence_parallel))
