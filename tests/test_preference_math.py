"""The offline preference losses (rlhf_ds/rl/preference.py) against hand-computed numbers (fp64), and the sequence
log-probs of a padded batch against each sequence computed alone. No DeepSpeed, no launch."""
from __future__ import annotations

import math

import pytest
import torch

from rlhf_ds.rl.math import logprobs_from_logits, weighted_mean
from rlhf_ds.rl.preference import preference_loss, sequence_logps

T = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
# policy chosen -10, rejected -12; reference -11, -11 (docs/notes: rlhf-math.md)
PC, PR, RC, RR = T(-10.0), T(-12.0), T(-11.0), T(-11.0)


def test_sigmoid_dpo_by_hand():
    # h = (-10 + 11) - (-12 + 11) = 2; beta h = 0.2; loss = log(1 + e^-0.2)
    losses, chosen, rejected = preference_loss("sigmoid", PC, PR, RC, RR, beta=0.1)
    assert losses.item() == pytest.approx(0.598139, abs=1e-6)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.2)), rel=1e-12)
    assert chosen.item() == pytest.approx(0.1, rel=1e-12) and rejected.item() == pytest.approx(-0.1, rel=1e-12)
    # at the start of training the policy is the reference: h = 0, loss ln 2, rewards 0
    losses, chosen, rejected = preference_loss("sigmoid", PC, PR, PC, PR, beta=0.1)
    assert losses.item() == pytest.approx(math.log(2), rel=1e-12) and chosen.item() == rejected.item() == 0.0


def test_label_smoothed_dpo_by_hand():
    losses, chosen, _ = preference_loss("sigmoid", PC, PR, RC, RR, beta=0.1, label_smoothing=0.1)
    # 0.9 * log(1 + e^-0.2) + 0.1 * log(1 + e^0.2)
    assert losses.item() == pytest.approx(0.618139, abs=1e-6)
    assert losses.item() == pytest.approx(0.9 * math.log1p(math.exp(-0.2)) + 0.1 * math.log1p(math.exp(0.2)), rel=1e-12)
    assert chosen.item() == pytest.approx(0.1)  # smoothing changes the loss, not the implicit rewards
    # eps = 0.5: the label carries no information, the loss is symmetric in chosen/rejected
    a, _, _ = preference_loss("sigmoid", PC, PR, RC, RR, beta=0.1, label_smoothing=0.5)
    b, _, _ = preference_loss("sigmoid", PR, PC, RR, RC, beta=0.1, label_smoothing=0.5)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


def test_ipo_by_hand():
    losses, chosen, rejected = preference_loss("ipo", PC, PR, RC, RR, beta=0.1)
    assert losses.item() == pytest.approx(9.0, rel=1e-12)  # (2 - 1 / 0.2)^2
    assert (chosen - rejected).item() == pytest.approx(0.2)
    # minimum 0 exactly at h = 1 / (2 beta)
    losses, _, _ = preference_loss("ipo", T(-6.0), PR, RC, RR, beta=0.1)  # h = (-6 + 11) - (-12 + 11) = 6
    assert losses.item() == pytest.approx(1.0, rel=1e-12)
    losses, _, _ = preference_loss("ipo", T(-7.0), PR, RC, RR, beta=0.1)  # h = 4 + 1 = 5 = 1 / (2 beta)
    assert losses.item() == 0.0


def test_simpo_by_hand():
    # summed log-probs -10 over 5 tokens and -12 over 4 tokens: averages -2 and -3; beta 2, gamma 0.5 (gamma/beta 0.25)
    avg_c, avg_r = PC / 5, PR / 4
    losses, chosen, rejected = preference_loss("simpo", avg_c, avg_r, beta=2.0, gamma=0.5)
    assert losses.item() == pytest.approx(0.201413, abs=1e-6)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1.5)), rel=1e-12)
    assert chosen.item() == -4.0 and rejected.item() == -6.0
    # no reference: passing one changes nothing
    same, _, _ = preference_loss("simpo", avg_c, avg_r, T(123.0), T(-4.0), beta=2.0, gamma=0.5)
    assert same.item() == losses.item()


def test_losses_are_per_pair_and_gradients_point_the_right_way():
    pc = T(-10.0, -12.0, -5.0).requires_grad_()
    pr = T(-12.0, -10.0, -5.0).requires_grad_()
    losses, chosen, rejected = preference_loss("sigmoid", pc, pr, T(-11.0, -11.0, -5.0), T(-11.0, -11.0, -5.0), beta=0.1)
    assert losses.shape == (3,) and not chosen.requires_grad
    assert (chosen > rejected).tolist() == [True, False, False]
    weighted_mean(losses, T(1.0, 1.0, 2.0)).backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # raise the chosen log-prob, lower the rejected one
    assert weighted_mean(losses.detach(), T(1.0, 1.0, 2.0)).item() == pytest.approx(
        (losses[0] + losses[1] + 2 * losses[2]).item() / 4)
    with pytest.raises(ValueError, match="unknown preference loss"):
        preference_loss("kto", pc, pr, pc, pr, beta=0.1)


def test_sequence_logps_by_hand_and_padding_invariant():
    # vocabulary 3, uniform logits except where set: log-probs are known in closed form
    logits = torch.zeros(1, 5, 3, dtype=torch.float64)
    logits[0, 2, 1] = math.log(2.0)  # position 2 predicts token 3: p(1) = 2/4
    ids = torch.tensor([[0, 2, 2, 1, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])  # last column is padding
    total, n = sequence_logps(logprobs_from_logits(logits[:, :-1], ids[:, 1:]), ids, mask, torch.tensor([2]))
    # response tokens: index 2 (predicted at 1, uniform: log 1/3) and index 3 (predicted at 2: log 1/2); pad excluded
    assert n.tolist() == [2]
    assert total.item() == pytest.approx(math.log(1 / 3) + math.log(1 / 2), rel=1e-12)

    # a real model: rows of a right-padded batch equal each sequence alone (position ids count real tokens)
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf_ds.data.features import pad_batch
    from rlhf_ds.models.inputs import position_ids

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                       initializer_range=0.5, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)).eval()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 40, (n,), generator=g).tolist() for n in (7, 12, 4, 9)]
    prompt_lens = torch.tensor([3, 5, 2, 4])

    def logps(batch_seqs, plens):
        ids, mask = pad_batch(batch_seqs, 0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
        return sequence_logps(logprobs_from_logits(logits[:, :-1], ids[:, 1:]), ids, mask, plens)

    together, counts = logps(seqs, prompt_lens)
    assert counts.tolist() == [len(s) - p for s, p in zip(seqs, prompt_lens.tolist())]
    for i, s in enumerate(seqs):
        alone, _ = logps([s], prompt_lens[i : i + 1])
        assert together[i].item() == pytest.approx(alone.item(), abs=1e-5), i
