"""The hybrid engine: the actor switches between training mode (ZeRO-3 sharded) and generation mode every PPO step.

Generation mode, portable path (default, runs on CPU and GPU):
  1. the actor's partitioned parameters are gathered in groups of `gather_group_size` tensors (the memory budget of
     the gather) and copied, LoRA deltas fused in, into a plain hook-free copy of the architecture
     (`engine.params.iter_full_params`: one flat all-gather per group for plain ZeRO-3 shards);
  2. that copy decodes with Hugging Face `generate` and its KV cache, dropout off (eval mode), on every rank
     independently — ranks never wait for each other during decoding, so different response lengths, turn counts
     or sampling rounds cannot hang (step 1 is `sync_weights`, once per step; step 2 is `generate`, as often as needed);
  3. back in training mode nothing needs undoing: the training module, its shards and optimizer state were only read.
Measured on CPU (shared/notes): ZeRO-3 hooks firing per submodule make gathered-in-place generation ~5x slower than
the same weights in a plain module, which is why the copy exists. The copy is kept between steps (`keep_copy`) to
avoid re-allocating it, or released after each step's rollouts (`release`) when memory is tight.

DeepSpeed's own CUDA hybrid engine can be chosen with `backend="deepspeed"` where it exists (CUDA, supported model
families); it fails on CPU ("not implemented on CPU backend"), so it is refused there with a clear message.
"""
from __future__ import annotations

import time

import torch

from rlhf_ds.config import GenerationConfig
from rlhf_ds.engine import strategy
from rlhf_ds.models.unsharded import build_plain, copy_into
from rlhf_ds.rollout.base import GenerationOutput, sampling_kwargs
from rlhf_ds.rollout.fast_decode import FastDecoder

# model families DeepSpeed's inference containers support for its hybrid engine
DEEPSPEED_HYBRID_FAMILIES = {"opt", "bloom", "gptj", "gpt_neo", "gpt_neox", "llama", "internlm"}


def check_deepspeed_backend(model_type: str) -> None:
    """Whether hybrid.backend=deepspeed can run here and on this model family; ValueError saying why not."""
    if strategy.on_cpu():
        raise ValueError("hybrid.backend=deepspeed needs CUDA inference kernels (DeepSpeed fails on CPU with "
                         "'This op had not been implemented on CPU backend'); use hybrid.backend=portable")
    if model_type not in DEEPSPEED_HYBRID_FAMILIES:
        raise ValueError(f"DeepSpeed's hybrid engine does not support '{model_type}' models "
                         f"(only {sorted(DEEPSPEED_HYBRID_FAMILIES)}); use hybrid.backend=portable")


class HybridEngine:
    def __init__(self, actor_engine, pad_token_id: int, eos_token_id: int, backend: str = "portable",
                 gather_group_size: int = 32, keep_copy: bool = True, dtype: torch.dtype | None = None,
                 decode: str = "hf"):
        self.actor = actor_engine
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
        self.backend = backend
        self.group_size = gather_group_size
        self.keep_copy = keep_copy
        self.dtype = dtype
        self._plain = None
        self._decoder = FastDecoder(decode, backend=backend, keep_copy=keep_copy)  # hybrid.decode; refuses CPU

    @property
    def rank_local(self) -> bool:
        """DeepSpeed's engine gathers ZeRO-3 shards inside its `generate`: every rank must call it alike."""
        return self.backend == "portable"

    @torch.no_grad()
    def sync_weights(self) -> float:
        """Collective: the trained actor's weights (LoRA deltas fused) into the plain copy, built on first use.
        DeepSpeed's CUDA hybrid engine switches modes inside its own `generate`: nothing to do here."""
        t0 = time.time()
        if self.backend == "portable":
            module = strategy.unwrap(self.actor)
            if self._plain is None:
                dtype = self.dtype or next(module.parameters()).dtype
                self._plain = build_plain(module, strategy.device(), dtype)
            copy_into(module, self._plain, self.group_size)
        return time.time() - t0

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, gen: GenerationConfig) -> GenerationOutput:
        """Responses for left-padded prompts from the copy the last sync wrote; rank-local (portable backend)."""
        t0 = time.time()
        if self.backend == "portable" and self._plain is None:
            raise RuntimeError("generate() before sync_weights(): the generation copy holds no weights")
        model = self.actor if self.backend == "deepspeed" else self._plain
        dev = strategy.device()
        out = self._decoder.generate(model, input_ids=prompt_ids.to(dev), attention_mask=prompt_mask.to(dev),
                                     **sampling_kwargs(gen, self.pad_token_id, self.eos_token_id, gen.max_new_tokens))
        return GenerationOutput(out, prompt_ids.shape[1], time.time() - t0)

    def release(self) -> None:
        if not self.keep_copy:
            self._plain = None
