"""The one place that turns a batch of token ids into a model call: every forward pass (LM loss, reward-model and critic
scores, PPO log-probs and values, DPO log-probs) goes through `token_outputs` or, for log-probs, `token_logprobs`, which
computes them from the last hidden states a chunk of tokens at a time, so full-vocabulary logits never exist whole.

A batch is `[B, T]` ids with an attention mask (left, right or both sides padded). Padded, the model sees the batch as
it is, positions counted over real tokens only (so padding never shifts them). Packed (padding-free), the real tokens
of all B sequences run as one row of N tokens with positions restarting at 0 for each sequence, and attention kept
within each sequence: flash-attention's variable-length kernels read the sequence boundaries from the position ids;
sdpa and eager attention get a block-diagonal causal mask through transformers' custom 4-D mask input (not every family
passes position ids to its mask builder: OPT does not). That mask is N x N: a token budget per micro-batch bounds it.
Either way the caller gets per-token outputs back in the `[B, T, ...]` layout of its batch (zeros at padding), so
losses are written once for both.
"""
from __future__ import annotations

import inspect
import types

import torch

from rlhf_ds.rl import math as rlm


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them (pad invariance)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_outputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, packing: bool = False,
                  output: str = "logits") -> torch.Tensor:
    """`model`'s per-token `output` ("logits" of a causal LM, "last_hidden_state" of a backbone) for a padded batch,
    `[B, T, ...]`; `packing` runs the real tokens as one padding-free row. `model` may be a DeepSpeed engine."""
    return _forward(model, input_ids, attention_mask, packing, lambda out: getattr(out, output))


def _forward(model, input_ids, attention_mask, packing: bool, pick, **kwargs) -> torch.Tensor:
    """`pick(model output)` (a `[rows, tokens, ...]` tensor) in the `[B, T, ...]` layout of the batch."""
    positions = position_ids(attention_mask)
    if not packing:
        return pick(model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False,
                          **kwargs))
    real = attention_mask.bool()
    packed_positions = positions[real].unsqueeze(0)
    out = model(input_ids=input_ids[real].unsqueeze(0), position_ids=packed_positions,
                attention_mask=packed_attention_mask(packed_positions[0], getattr(model, "module", model).config),
                use_cache=False, **kwargs)  # a DeepSpeed engine's own `config` is its JSON: the model's is on its module
    packed = pick(out)[0]
    full = packed.new_zeros(*input_ids.shape, *packed.shape[1:])
    full[real] = packed
    return full


# Config fields of families that change the logits after the output projection (soft-capping, scaling): those run
# the model's own head on the whole sequence instead of the chunked one.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _chunkable(lm) -> bool:
    config = lm.config
    if any(getattr(config, key, None) not in (None, 1, 1.0) for key in LOGIT_TRANSFORMS):
        return False
    # a plain projection: not one with LoRA adapters or other wrappers, whose own forward must run
    return ("logits_to_keep" in inspect.signature(lm.forward).parameters
            and type(lm.get_output_embeddings()) is torch.nn.Linear)


def final_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, packing: bool = False):
    """(the causal LM's last hidden states `[B, T, H]`, its output projection), the model's forward computing logits
    for one position only; None where the family cannot (see LOGIT_TRANSFORMS): then the caller uses the logits."""
    lm = getattr(model, "module", model)
    lm = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # peft: the transformers model inside
    if not _chunkable(lm):
        return None
    captured = []
    hook = lm.base_model.register_forward_hook(lambda _m, _a, out: captured.append(out[0]))
    try:
        # called through `model` (a DeepSpeed engine, peft) so ZeRO-3 gathers and LoRA apply as in any forward
        hidden = _forward(model, input_ids, attention_mask, packing, lambda _out: captured[-1], logits_to_keep=1)
    finally:
        hook.remove()
    return hidden, lm.get_output_embeddings()


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, packing: bool = False,
                   temperature: float = 1.0, start: int = 1, with_entropy: bool = False, chunk_tokens: int = 0,
                   labels: torch.Tensor | None = None):
    """Log-prob of each token `labels[:, t]` (default: `input_ids`) for t >= `start` given the tokens before it,
    `[B, T - start]`, logits divided by `temperature` (and the entropy of each of those distributions).

    `chunk_tokens` > 0: from the last hidden states, the output projection and log-softmax run on that many real
    tokens at a time, in forward and backward, so no `[B, T, vocab]` logits (nor their fp32 copies) ever exist whole;
    positions whose label is padding (attention mask 0, or label -100) are not computed and read 0. 0: the model's
    full logits, as any caller of `token_outputs`.
    """
    labels = input_ids if labels is None else labels
    targets = labels[:, start:]
    picked = final_hidden_states(model, input_ids, attention_mask, packing) if chunk_tokens > 0 else None
    if picked is None:
        logits = token_outputs(model, input_ids, attention_mask, packing)[:, start - 1 : -1]
        safe = targets.clamp(min=0)  # -100 labels: any id; the caller selects them away
        logp = rlm.logprobs_from_logits(logits, safe, temperature)
        return (logp, rlm.entropy_from_logits(logits, temperature)) if with_entropy else logp
    hidden, head = picked
    real = attention_mask[:, start:].bool() & (targets >= 0)
    logp, entropy = _head_logprobs(head, hidden[:, start - 1 : -1][real], targets[real], temperature, chunk_tokens)
    outs = []
    for flat in (logp, entropy)[: 2 if with_entropy else 1]:
        full = flat.new_zeros(targets.shape)
        full[real] = flat
        outs.append(full)
    return tuple(outs) if with_entropy else outs[0]


def _head_logprobs(head: torch.nn.Linear, rows: torch.Tensor, ids: torch.Tensor, temperature: float, chunk: int):
    """`rlm.chunked_projection_logprobs` with `head`'s weights, inside one call of `head`: ZeRO-3 gathers its weights
    once for all chunks (the same collectives on every rank, however many tokens each has) and again for backward."""
    def chunked(self, hidden):
        return rlm.chunked_projection_logprobs(hidden, self.weight, self.bias, ids, temperature, chunk)

    head.forward = types.MethodType(chunked, head)
    try:
        return head(rows)
    finally:
        del head.forward  # back to the class's forward


def packed_attention_mask(positions: torch.Tensor, config):
    """The `[1, 1, N, N]` mask of a packed row whose sequences start where `positions` is 0 (causal within each
    sequence, nothing across), in the form the configured attention takes; None for flash-attention, whose
    variable-length kernels take the boundaries from the position ids."""
    impl = getattr(config, "_attn_implementation", None) or "sdpa"
    if "flash" in impl:
        return None
    sequence = (positions == 0).cumsum(0)
    n = positions.shape[0]
    allowed = (sequence[:, None] == sequence[None, :]) & torch.ones(n, n, dtype=torch.bool,
                                                                   device=positions.device).tril()
    if impl == "eager":  # added to the scores
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        allowed = torch.zeros(n, n, dtype=dtype, device=positions.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed[None, None]
