"""Log-probs, entropies and KL from the last hidden states a chunk of tokens at a time (`token_logprobs` with
`chunk_tokens` > 0) equal the full-logits computation, values and gradients, padded and packed, with and without LoRA."""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rlhf_ds.models.inputs import output_projection, token_logprobs
from rlhf_ds.rl import math as rlm

VOCAB = 97


def llama(seed: int):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


def gpt2(seed: int):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, initializer_range=0.2,
                     resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    return GPT2LMHeadModel(cfg).eval()


def with_lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))


def batch(side: str):
    """Four sequences of different lengths, padded on `side`."""
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(1, VOCAB, (n,), generator=g) for n in (9, 14, 5, 11)]
    T = max(len(s) for s in seqs)
    ids, mask = torch.zeros(len(seqs), T, dtype=torch.long), torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        where = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, where], mask[i, where] = s, 1
    return ids, mask


def figures(policy, reference, ids, mask, packing, chunk, start):
    """Per-token log-probs, entropies and k3 KL to the reference, and the gradient of a loss using all three."""
    policy.zero_grad()
    logp, entropy = token_logprobs(policy, ids, mask, packing, 0.7, start, True, chunk)
    with torch.no_grad():
        ref = token_logprobs(reference, ids, mask, packing, 0.7, start, False, chunk)
    real = mask[:, start:].bool() & mask[:, start - 1 : -1].bool()  # a row's first token has no prediction
    kl = rlm.kl_per_token(logp, ref, "k3")
    loss = rlm.masked_mean(logp * 0.3 + entropy * 0.2 + kl, real)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    select = lambda x: torch.where(real, x, torch.zeros_like(x)).detach()  # noqa: E731
    return select(logp), select(entropy), select(kl), grads


@pytest.mark.parametrize("arch", ["llama", "gpt2", "llama_lora"])
@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("side", ["left", "right"])
def test_chunked_equals_full_logits(arch, packing, side):
    make = {"llama": llama, "gpt2": gpt2, "llama_lora": lambda s: with_lora(llama(s))}[arch]
    policy, reference = make(0), make(1)
    ids, mask = batch(side)
    for start in (1, 4):  # every next token (SFT, DPO), or a response after a 4-token prompt (PPO)
        full = figures(policy, reference, ids, mask, packing, 0, start)
        chunked = figures(policy, reference, ids, mask, packing, 3, start)  # 3 tokens a chunk: many chunks
        for name, a, b in zip(("logp", "entropy", "kl"), full[:3], chunked[:3]):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (name, (a - b).abs().max())
            assert a.abs().sum() > 0  # real figures, not zeros on both sides
        assert full[3].keys() == chunked[3].keys() and len(full[3]) > 0
        for n, g in full[3].items():  # to 1e-5 of each gradient's scale (fp32 sums in another order: ~1e-6 seen)
            assert (g - chunked[3][n]).abs().max() <= 1e-5 * g.abs().max(), (n, (g - chunked[3][n]).abs().max())


def test_sft_labels_and_ignored_positions():
    """With labels (SFT): -100 positions are not computed and read 0; the others equal cross-entropy's."""
    model = llama(0)
    ids, mask = batch("right")
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # a prompt that is not trained on
    logp = token_logprobs(model, ids, mask, chunk_tokens=4, labels=labels)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                           ignore_index=-100, reduction="none").view(labels[:, 1:].shape)
    assert torch.allclose(-logp.detach(), ce, atol=1e-5)
    assert (logp[labels[:, 1:] == -100] == 0).all()


def test_families_that_transform_logits_use_the_full_head():
    model = llama(0)
    assert output_projection(model) is model.lm_head
    model.config.final_logit_softcapping = 30.0  # Gemma-2 style: the head's logits are changed after the projection
    assert output_projection(model) is None
    ids, mask = batch("right")
    logp = token_logprobs(model, ids, mask, chunk_tokens=4)  # falls back to the model's own logits
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(logp.detach()[mask[:, 1:].bool()],
                          rlm.logprobs_from_logits(logits[:, :-1], ids[:, 1:])[mask[:, 1:].bool()], atol=1e-5)


def test_a_frozen_output_layer_gets_no_gradient_and_the_hidden_states_the_same(monkeypatch):
    """LoRA freezes the output layer: its [vocabulary, hidden] gradient is not even allocated."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(9, 16, generator=g).requires_grad_()
    weight, ids = 0.3 * torch.randn(50, 16, generator=g), torch.randint(0, 50, (9,), generator=g)
    logp, entropy = rlm.chunked_projection_logprobs(hidden, weight, None, ids, 1.0, 4)
    shapes, zeros = [], torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: shapes.append(tuple(a[0])) or zeros(*a, **k))
    (logp.sum() + entropy.sum()).backward()
    monkeypatch.undo()
    assert tuple(weight.shape) not in shapes
    chunked = hidden.grad.clone()
    hidden.grad = None
    logits = torch.nn.functional.linear(hidden, weight)
    (rlm.logprobs_from_logits(logits, ids).sum() + rlm.entropy_from_logits(logits).sum()).backward()
    assert weight.grad is None and torch.allclose(chunked, hidden.grad, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_chunked_projection_equals_autograd_through_whole_logits(dtype, tol):
    """The hand-written backward (d logp/dz = onehot - p, d entropy/dz = -p (z - E_p z)) against autograd, with a bias
    and a temperature, for every chunk size from one row to all of them."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 16, generator=g).to(dtype).requires_grad_()
    weight = (0.3 * torch.randn(50, 16, generator=g)).to(dtype).requires_grad_()
    bias = (0.1 * torch.randn(50, generator=g)).to(dtype).requires_grad_()
    ids = torch.randint(0, 50, (13,), generator=g)
    w_logp, w_ent = torch.randn(13, generator=g), torch.randn(13, generator=g)

    def run(fn):
        for t in (hidden, weight, bias):
            t.grad = None
        logp, entropy = fn()
        ((logp * w_logp).sum() + (entropy * w_ent).sum()).backward()
        return [logp.detach(), entropy.detach()] + [t.grad.float().clone() for t in (hidden, weight, bias)]

    def whole():
        logits = torch.nn.functional.linear(hidden, weight, bias)
        return rlm.logprobs_from_logits(logits, ids, 0.7), rlm.entropy_from_logits(logits, 0.7)

    expected = run(whole)
    for chunk in (1, 4, 13, 100):
        got = run(lambda: rlm.chunked_projection_logprobs(hidden, weight, bias, ids, 0.7, chunk))
        for name, a, b in zip(("logp", "entropy", "d_hidden", "d_weight", "d_bias"), expected, got):
            assert (a - b).abs().max() <= tol * max(1.0, a.abs().max().item()), (chunk, name, (a - b).abs().max())
