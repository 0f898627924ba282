"""The one place that turns a batch of token ids into a model call: every forward pass (LM loss, reward-model and critic
scores, PPO log-probs and values, DPO log-probs) goes through `token_outputs`.

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

import torch


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
