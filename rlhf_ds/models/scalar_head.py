"""A causal-LM backbone plus a scalar head: the reward model (score at the last real token) and the critic (a value per
token). Saved as a Hugging Face backbone folder + `scalar_head.safetensors` + `scalar_head.json` (normalisation), so it
reloads without DeepSpeed.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from rlhf_ds.engine import strategy
from rlhf_ds.models.loading import (ModelLoadError, check_safetensors, load_pretrained, load_tokenizer,
                                     resolve_model_dir)
from rlhf_ds.engine.params import full_state_dict, is_peft
from rlhf_ds.models.inputs import token_outputs
from rlhf_ds.models.unsharded import copy_into
from rlhf_ds.rl.math import last_token_index
from rlhf_ds.utils import atomic_directory, barrier, is_rank0

HEAD_WEIGHTS = "scalar_head.safetensors"
HEAD_META = "scalar_head.json"


class ScalarHeadModel(torch.nn.Module):
    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Linear, offset: float = 0.0, gain: float = 1.0):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.offset = offset  # normalisation: score = gain * (raw - offset); training always uses raw values
        self.gain = gain

    @property
    def config(self):
        base = self.backbone.get_base_model() if is_peft(self.backbone) else self.backbone
        return base.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, packing: bool = False) -> torch.Tensor:
        """Raw scalar per token, [B, T] in fp32 (`packing`: padding-free, models/inputs.py)."""
        hidden = token_outputs(self.backbone, input_ids, attention_mask, packing, output="last_hidden_state")
        return self.head(hidden).squeeze(-1).float()

    def raw_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, packing: bool = False) -> torch.Tensor:
        """Raw value at the last real token of each sequence (left or right padding), [B]."""
        return last_token_scores(self, input_ids, attention_mask, packing)

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        return self.gain * (raw - self.offset)


def last_token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, packing: bool = False):
    """`model`'s raw value at the last real token of each sequence, [B]. `model` is a ScalarHeadModel or its DeepSpeed
    engine; a trained one must be called through the engine, whose forward advances ZeRO-3's gradient-accumulation
    count (called on the module, every micro-batch's gradient replaces the previous one instead of adding to it)."""
    values = model(input_ids, attention_mask, packing)
    return values.gather(1, last_token_index(attention_mask).unsqueeze(1)).squeeze(1)


def load_scalar_head_model(
    path: str,
    ds_config: dict,
    precision: str = "fp32",
    disable_dropout: bool = True,
    trust_remote_code: bool = False,
    tokenizer=None,
    head_seed: int = 0,
) -> ScalarHeadModel:
    """From a saved reward model (head + normalisation restored) or any causal-LM folder (new head).

    Under ZeRO-3 the head is built inside the same `zero.Init` as the backbone, in the same dtype, so the engine sees
    one uniformly partitioned module (a head built outside trips DeepSpeed's mixed-dtype check).
    """
    saved_head = read_saved_head(resolve_model_dir(path))  # before the backbone: a broken head fails fast
    backbone, path = load_pretrained(AutoModel, path, ds_config, precision, disable_dropout, trust_remote_code, tokenizer)
    dtype = strategy.torch_dtype(precision)
    hidden = backbone.config.hidden_size
    with strategy.zero3_init(ds_config):
        head = torch.nn.Linear(hidden, 1, bias=True, dtype=dtype)

    meta = {"offset": 0.0, "gain": 1.0}
    if saved_head is not None:
        meta.update(saved_head[0])
        init = saved_head[1]
        if tuple(init["weight"].shape) != (1, hidden):
            raise ModelLoadError(f"{os.path.join(path, HEAD_WEIGHTS)}: head weight of shape {tuple(init['weight'].shape)} "
                                 f"does not fit the backbone (hidden size {hidden}, expected (1, {hidden}))")
    else:  # seeded so every rank and every ZeRO stage starts from the same head
        g = torch.Generator().manual_seed(head_seed)
        init = {"weight": torch.randn(1, hidden, generator=g) / (hidden + 1) ** 0.5, "bias": torch.zeros(1)}
    with strategy.gathered(head.parameters(), modifier_rank=0):
        with torch.no_grad():
            head.weight.copy_(init["weight"].to(dtype))
            head.bias.copy_(init["bias"].to(dtype))
    return ScalarHeadModel(backbone, head, offset=float(meta["offset"]), gain=float(meta["gain"]))


def read_saved_head(path: str) -> Optional[tuple[dict, dict]]:
    """(normalisation, {"weight", "bias"}) of a saved reward model, None for a plain causal-LM folder (a new head).

    A folder holding only one of the two head files, or unreadable ones, is refused rather than given a random head.
    """
    meta_path, weights_path = os.path.join(path, HEAD_META), os.path.join(path, HEAD_WEIGHTS)
    has_meta, has_weights = os.path.isfile(meta_path), os.path.isfile(weights_path)
    if not has_meta and not has_weights:
        return None
    if not (has_meta and has_weights):
        missing, present = (HEAD_WEIGHTS, HEAD_META) if has_meta else (HEAD_META, HEAD_WEIGHTS)
        raise ModelLoadError(f"{path}: reward-model folder has {present} but no {missing}; copy the whole folder "
                             f"again, or delete {present} to start from a new head")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{meta_path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k, 0.0), (int, float)) for k in ("offset", "gain")):
        raise ModelLoadError(f"{meta_path}: expected an object with numeric 'offset' and 'gain'")
    check_safetensors(weights_path)
    saved = load_file(weights_path)
    if set(saved) != {"weight", "bias"}:
        raise ModelLoadError(f"{weights_path}: expected tensors 'weight' and 'bias', found {', '.join(sorted(saved))}")
    return meta, {"weight": saved["weight"], "bias": saved["bias"]}


def save_scalar_head_model(model: ScalarHeadModel, tokenizer, out_dir: str, extra_meta: Optional[dict] = None) -> None:
    """Backbone as a Hugging Face folder (LoRA merged) + head + normalisation, written atomically by rank 0."""
    base = model.backbone.get_base_model() if is_peft(model.backbone) else model.backbone
    plain = None
    if is_rank0():
        plain = type(base)._from_config(base.config, dtype=next(model.head.parameters()).dtype)
    copy_into(model.backbone, plain)
    head_state = full_state_dict(model.head)
    if is_rank0():
        with atomic_directory(out_dir) as tmp:
            plain.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            save_file({k: v.contiguous() for k, v in head_state.items()}, os.path.join(tmp, HEAD_WEIGHTS))
            meta = {"offset": model.offset, "gain": model.gain, **(extra_meta or {})}
            with open(os.path.join(tmp, HEAD_META), "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=2)
    barrier()


class RewardScorer:
    """Scores (prompt, response) texts with a saved reward model, no DeepSpeed needed.

    Right padding within a batch and the batch composition do not change a score (positions count real tokens only).
    """

    def __init__(self, path: str, device: str = "cpu", precision: str = "fp32", max_prompt_tokens: int = 256,
                 max_seq_len: int = 512):
        self.tokenizer = load_tokenizer(path)
        self.model = load_scalar_head_model(path, {}, precision, tokenizer=self.tokenizer).to(device).eval()
        self.device = device
        self.max_prompt_tokens, self.max_seq_len = max_prompt_tokens, max_seq_len

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str], batch_size: int = 32, normalised: bool = True) -> list[float]:
        from rlhf_ds.data.features import pad_batch, pair_ids

        out: list[float] = []
        for i in range(0, len(prompts), batch_size):
            seqs = pair_ids(self.tokenizer, prompts[i : i + batch_size], responses[i : i + batch_size],
                            self.max_prompt_tokens, self.max_seq_len)
            input_ids, mask = pad_batch(seqs, self.tokenizer.pad_token_id, side="right")
            raw = self.model.raw_scores(input_ids.to(self.device), mask.to(self.device))
            out += (self.model.normalise(raw) if normalised else raw).tolist()
        return out


def reward_lengths(max_prompt_tokens: int, max_new_tokens: int, positions: int | None) -> tuple[int, int]:
    """The reward model's (prompt tokens, sequence tokens) for a policy's budget: 4 of the RM's tokens per policy token
    (its tokenizer may split the same text finer), within its positions, the prompt at most half. The one length
    budget of PPO's reward model, `serve-reward`, `eval`, `score`, `chat` and `rm-report`."""
    seq = min(4 * (max_prompt_tokens + max_new_tokens), positions or 1 << 30)
    return max(2, min(4 * max_prompt_tokens, seq // 2)), seq


def reward_scorer(path: str, device: str, precision: str = "fp32", max_prompt_tokens: int = 256,
                  max_new_tokens: int = 256) -> RewardScorer:
    """A RewardScorer for texts from a policy with this budget (`reward_lengths`)."""
    from transformers import AutoConfig

    from rlhf_ds.models.loading import max_positions, resolve_model_dir

    prompt, seq = reward_lengths(max_prompt_tokens, max_new_tokens,
                                 max_positions(AutoConfig.from_pretrained(resolve_model_dir(path))))
    return RewardScorer(path, device=device, precision=precision, max_prompt_tokens=prompt, max_seq_len=seq)
