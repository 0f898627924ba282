"""Every forward of a padded batch carries its attention mask: generation (tools, eval, PPO rollouts), log-probs,
values and reward scores. transformers warns "We strongly recommend passing in an `attention_mask`" when a padded
batch comes without one; a user saw it on every PPO and generate run. A forward pre-hook on each model records any
call without a mask, for GPT-2 and LLaMA."""
from __future__ import annotations

import pytest
import torch

from dist_hybrid_models import tiny_models
from rlhf_ds.config import GenerationConfig
from rlhf_ds.data.builtin_task import BuiltinTask
from rlhf_ds.data.features import pad_batch, prompt_features
from rlhf_ds.data.formats import PromptExample
from rlhf_ds.models.loading import load_causal_lm, load_tokenizer
from rlhf_ds.models.scalar_head import load_scalar_head_model
from rlhf_ds.rl.experience import sequence_logprobs, token_values
from rlhf_ds.steps.evaluate import generate


def record_maskless_calls(module: torch.nn.Module) -> list[str]:
    calls: list[str] = []

    def hook(mod, args, kwargs):
        if kwargs.get("attention_mask") is None:
            calls.append(type(mod).__name__)

    module.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_no_forward_without_a_mask(arch, tmp_path_factory):
    models = tiny_models(tmp_path_factory)
    tok = load_tokenizer(models[arch])
    policy = load_causal_lm(models[arch], {}, "fp32", disable_dropout=True, tokenizer=tok).eval()
    critic = load_scalar_head_model(models[f"{arch}_rm"], {}, "fp32", tokenizer=tok).eval()
    backbone_calls = record_maskless_calls(policy)
    head_calls = record_maskless_calls(critic.backbone)

    prompts = list(BuiltinTask(0).eval_prompt_set[:6])  # different lengths: left padding in every batch
    torch.manual_seed(0)
    out = generate(policy, tok, prompts, GenerationConfig(max_new_tokens=8, do_sample=True), batch_size=6,
                   max_prompt_tokens=32)
    assert len(out) == 6
    ids, _ = prompt_features([PromptExample(prompt=p) for p in prompts], tok, 32)
    seq, mask = pad_batch([i + [tok.eos_token_id] for i in ids], tok.pad_token_id, side="left")
    with torch.no_grad():
        sequence_logprobs(policy, seq, mask, seq.shape[1] - 1, 1.0)
        token_values(critic, seq, mask, seq.shape[1] - 1)
    assert backbone_calls == [] and head_calls == []

    # the hook does see a forward without a mask
    with torch.no_grad():
        policy(input_ids=seq)
    assert backbone_calls == [type(policy).__name__]
