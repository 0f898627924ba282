"""The one place that turns a batch of token ids into a model call: every forward pass (LM loss, reward-model and critic
scores, PPO log-probs and values, DPO log-probs) goes through `token_outputs` or, for log-probs, `token_logprobs`, whose
output layer computes them a chunk of tokens at a time, so full-vocabulary logits never exist whole.

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
    positions = position_ids(attention_mask)
    if not packing:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False)
        return getattr(out, output)
    real = attention_mask.bool()
    packed_positions = positions[real].unsqueeze(0)
    out = model(input_ids=input_ids[real].unsqueeze(0), position_ids=packed_positions,
                attention_mask=packed_attention_mask(packed_positions[0], getattr(model, "module", model).config),
                use_cache=False)  # a DeepSpeed engine's own `config` is its JSON: the model's is on its module
    packed = getattr(out, output)[0]
    full = packed.new_zeros(*input_ids.shape, *packed.shape[1:])
    full[real] = packed
    return full


# Config fields of families that change the logits after the output projection (soft-capping, scaling): those run
# the model's own head on the whole sequence instead of the chunked one.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def output_projection(model):
    """The causal LM's output layer where `token_logprobs` may run it chunked, else None: a plain `nn.Linear` (not one
    with LoRA adapters or another wrapper, whose own forward must run) that the model's forward applies to its last
    hidden states and returns as is (families that soft-cap or scale logits: see LOGIT_TRANSFORMS)."""
    lm = getattr(model, "module", model)
    lm = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # peft: the transformers model inside
    if any(getattr(lm.config, key, None) not in (None, 1, 1.0) for key in LOGIT_TRANSFORMS):
        return None
    head = lm.get_output_embeddings()
    if "logits_to_keep" not in inspect.signature(lm.forward).parameters or type(head) is not torch.nn.Linear:
        return None
    return head


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, packing: bool = False,
                   temperature: float = 1.0, start: int = 1, with_entropy: bool = False, chunk_tokens: int = 0,
                   labels: torch.Tensor | None = None):
    """Log-prob of each token `labels[:, t]` (default: `input_ids`) for t >= `start` given the tokens before it,
    `[B, T - start]`, logits divided by `temperature` (and the entropy of each of those distributions).

    `chunk_tokens` > 0: the model's output layer, for this one forward, turns each last hidden state whose next token
    is real (it and the position before it have attention mask 1, label not -100) into its log-prob and entropy,
    `chunk_tokens` tokens at a time in forward and backward (`rlm.chunked_projection_logprobs`), so no `[B, T, vocab]`
    logits (nor their fp32 copies) ever exist whole; other positions read 0. The projection stays inside the model's forward, so a DeepSpeed engine sees
    its outputs as usual (ZeRO-3 gathers, backward hooks). 0, or a family `output_projection` refuses: the model's
    full logits, as any caller of `token_outputs`.
    """
    labels = input_ids if labels is None else labels
    targets = labels[:, start:]
    head = output_projection(model) if chunk_tokens > 0 else None
    if head is None:
        logits = token_outputs(model, input_ids, attention_mask, packing)[:, start - 1 : -1]
        safe = targets.clamp(min=0)  # -100 labels: any id; the caller selects them away
        logp = rlm.logprobs_from_logits(logits, safe, temperature)
        return (logp, rlm.entropy_from_logits(logits, temperature)) if with_entropy else logp
    # the id each position predicts (-1: none), in the layout the output layer sees (a packed row when packing)
    predicts = torch.full_like(input_ids, -1)
    # a token is predicted when it and the position before it are real (a row's first token has no prediction)
    real = attention_mask.bool()
    predicts[:, start - 1 : -1] = torch.where(real[:, start - 1 : -1] & real[:, start:] & (targets >= 0), targets, -1)
    layout = predicts[real].unsqueeze(0) if packing else predicts

    def chunked(self, hidden):
        wanted = layout >= 0
        logp, entropy = rlm.chunked_projection_logprobs(hidden[wanted], self.weight, self.bias, layout[wanted],
                                                        temperature, chunk_tokens)
        out = logp.new_zeros(*layout.shape, 2)
        out[wanted] = torch.stack([logp, entropy], -1)
        return out  # what the model returns as its "logits"

    head.forward = types.MethodType(chunked, head)
    try:
        both = token_outputs(model, input_ids, attention_mask, packing)[:, start - 1 : -1]
    finally:
        del head.forward  # back to the class's forward
    return (both[..., 0], both[..., 1]) if with_entropy else both[..., 0]


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
