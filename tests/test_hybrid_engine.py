"""The hybrid engine and the log-probs PPO computes from its rollouts.

In-process (plain models, no process group): left-padded log-probs equal each sequence's log-probs alone; the trainer's
log-probs of a sampled rollout (T != 1) equal a step-by-step recomputation and the distribution generation sampled
from; re-tokenised reward-model scores equal `RewardScorer`. On 2 ranks under ZeRO-3 (`tests/dist_hybrid_engine.py`
through the deepspeed launcher): greedy tokens vs unsharded generation, training state bit-identical across
generation, gather group sizes, ragged ranks, EMA swapping, LoRA fusion.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, cli_env, free_port
from dist_hybrid_models import RM_OFFSET, tiny_models

T = 0.7  # sampling temperature != 1: every log-prob evaluation must divide by it


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    return tiny_models(tmp_path_factory)


@pytest.fixture(autouse=True)
def one_thread():
    """In-process model runs share 2 cores with other test processes: one thread (more is many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load(path: str):
    from transformers import AutoModelForCausalLM

    from rlhf_ds.models.loading import load_tokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), load_tokenizer(path)


def prompts(n: int, offset: int = 0) -> list[str]:
    from rlhf_ds.data.builtin_task import BuiltinTask

    return [row["prompt"] for row in BuiltinTask(0).ppo_prompts(n + offset)][offset:]


def encode(tok, texts: list[str]) -> list[list[int]]:
    return [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]


# ---------------------------------------------------------------------------------------------------------------------
# log-probs
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_left_padded_logprobs_equal_each_sequence_alone(models, arch):
    from rlhf_ds.data.features import pad_batch
    from rlhf_ds.rl.experience import sequence_logprobs

    torch.manual_seed(0)
    model, tok = load(models[arch])
    prompt_ids = encode(tok, prompts(5))
    prompt_ids[1] = prompt_ids[1][:3]  # very different prompt lengths -> heavy left padding
    lengths = [7, 2, 5, 1, 6]  # responses of different lengths -> pads after them, masked
    responses = [torch.randint(5, len(tok), (n,)).tolist() for n in lengths]
    ids, pmask = pad_batch(prompt_ids, tok.pad_token_id, side="left")
    resp, rmask = pad_batch(responses, tok.pad_token_id, side="right")
    P = ids.shape[1]
    with torch.no_grad():
        batch = sequence_logprobs(model, torch.cat([ids, resp], 1), torch.cat([pmask, rmask], 1), P, T)
        assert batch.shape == resp.shape
        for i, (p, r) in enumerate(zip(prompt_ids, responses)):
            alone_seq = torch.tensor([p + r])
            alone = sequence_logprobs(model, alone_seq, torch.ones_like(alone_seq), len(p), T)[0]
            torch.testing.assert_close(batch[i, : len(r)], alone, atol=1e-5, rtol=0)


def _sampled_rollout(models, arch: str, n: int = 6, new_tokens: int = 20):
    """A sampled rollout through HybridEngine (T=0.7) plus the processed scores generate sampled each token from."""
    from rlhf_ds.config import GenerationConfig
    from rlhf_ds.data.features import pad_batch
    from rlhf_ds.rollout.hybrid import HybridEngine

    model, tok = load(models[arch])
    hybrid = HybridEngine(model, tok.pad_token_id, tok.eos_token_id)
    hybrid.sync_weights()  # builds the generation copy and fills it
    plain = hybrid._plain
    original, captured = plain.generate, {}

    def generate_with_scores(**kwargs):  # record what generate sampled from, hand back what HybridEngine expects
        out = original(**kwargs, output_scores=True, return_dict_in_generate=True)
        captured["scores"] = torch.stack(out.scores, 1)  # [B, R, V] after temperature/top-k/top-p processing
        return out.sequences

    plain.generate = generate_with_scores
    ids, pmask = pad_batch(encode(tok, prompts(n)), tok.pad_token_id, side="left")
    torch.manual_seed(3)
    out = hybrid.generate(ids, pmask, GenerationConfig(new_tokens, do_sample=True, temperature=T))
    return model, tok, out, pmask, captured["scores"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_trainer_logprobs_equal_stepwise_recomputation_and_sampling_distribution(models, arch):
    from rlhf_ds.rollout.base import response_mask
    from rlhf_ds.rl.experience import sequence_logprobs

    model, tok, out, pmask, scores = _sampled_rollout(models, arch)
    P, seq = out.prompt_len, out.sequences
    amask, has_eos = response_mask(seq[:, P:], tok.eos_token_id)
    assert has_eos.any() and amask.sum() > 0
    with torch.no_grad():
        logp = sequence_logprobs(model, seq, torch.cat([pmask, amask], 1), P, T)
        # generation sampled each token from softmax(logits / T) over the whole vocabulary (no hidden top-k default)
        sampled_from = torch.log_softmax(scores.float(), -1).gather(-1, seq[:, P:].unsqueeze(-1)).squeeze(-1)
        checked = 0
        for i in range(seq.shape[0]):
            real_prompt = seq[i, :P][pmask[i].bool()].tolist()
            for t in range(seq.shape[1] - P):
                if not amask[i, t]:
                    continue
                prefix = torch.tensor([real_prompt + seq[i, P : P + t].tolist()])
                step = torch.log_softmax(model(input_ids=prefix).logits[0, -1] / T, -1)[seq[i, P + t]]
                assert abs(logp[i, t].item() - step.item()) < 1e-5, (i, t, logp[i, t].item(), step.item())
                assert torch.isfinite(scores[i, t]).all(), "generation filtered the vocabulary (top-k/top-p default?)"
                assert abs(logp[i, t].item() - sampled_from[i, t].item()) < 1e-5, (i, t)
                checked += 1
    assert checked == int(amask.sum())


def test_trainer_logprobs_without_temperature_differ_from_sampling_distribution(models):
    """The check above can fail: scoring the same rollout at T=1 does not match what was sampled at T=0.7."""
    from rlhf_ds.rollout.base import response_mask
    from rlhf_ds.rl.experience import sequence_logprobs

    model, tok, out, pmask, scores = _sampled_rollout(models, "gpt2")
    P, seq = out.prompt_len, out.sequences
    amask, _ = response_mask(seq[:, P:], tok.eos_token_id)
    with torch.no_grad():
        wrong = sequence_logprobs(model, seq, torch.cat([pmask, amask], 1), P, 1.0)
    sampled_from = torch.log_softmax(scores.float(), -1).gather(-1, seq[:, P:].unsqueeze(-1)).squeeze(-1)
    assert (wrong - sampled_from)[amask.bool()].abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------------------------
# reward model with another tokenizer
# ---------------------------------------------------------------------------------------------------------------------
def test_retokenised_scores_equal_reward_scorer(models):
    """GPT-2 actor tokens -> text -> the LLaMA RM's tokenizer: ModelReward == RewardScorer.score."""
    from rlhf_ds.rewards.base import RewardBatch
    from rlhf_ds.rewards.model import ModelReward
    from rlhf_ds.rollout.base import response_mask
    from rlhf_ds.models.loading import load_tokenizer
    from rlhf_ds.models.scalar_head import RewardScorer, load_scalar_head_model

    model, tok, out, pmask, _ = _sampled_rollout(models, "gpt2", n=8, new_tokens=16)
    rm_tok = load_tokenizer(models["llama_rm"])
    assert len(rm_tok) != len(tok)
    reward = load_scalar_head_model(models["llama_rm"], {}, tokenizer=rm_tok).eval()
    assert reward.offset == RM_OFFSET
    model_reward = ModelReward(reward, tok, rm_tok, micro_batch_size=8, max_prompt_tokens=32, max_new_tokens=16)
    assert not model_reward.same_tokenizer
    P, seq = out.prompt_len, out.sequences
    amask, _ = response_mask(seq[:, P:], tok.eos_token_id)
    with torch.no_grad():
        scores = model_reward(RewardBatch([], [], [], seq, torch.cat([pmask, amask], 1), P))
    texts_p = tok.batch_decode(seq[:, :P], skip_special_tokens=True)
    texts_r = [tok.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(seq[:, P:], amask)]
    assert all(texts_r)
    expected = RewardScorer(models["llama_rm"]).score(texts_p, texts_r)
    torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-5, rtol=0)
    raw = RewardScorer(models["llama_rm"]).score(texts_p, texts_r, normalised=False)
    torch.testing.assert_close(scores, torch.tensor(raw) - RM_OFFSET, atol=1e-5, rtol=0)  # normalised, not raw


# ---------------------------------------------------------------------------------------------------------------------
# ZeRO-3 on 2 ranks
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dist_results(models, tmp_path_factory) -> list[dict]:
    out = str(tmp_path_factory.mktemp("hybrid") / "results.json")
    root = os.path.dirname(models["gpt2"])
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--no_local_rank", "--master_port",
           str(free_port()), os.path.join(REPO, "tests", "dist_hybrid_engine.py"), root, out]
    # a hang (ranks waiting on each other) fails here instead of blocking the suite
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(threads=1), capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    with open(out, encoding="utf-8") as f:
        res = json.load(f)
    assert len(res) == 2 and all(r["world"] == 2 and r["threads"] == 1 for r in res)
    return res


def _state_identical(state: dict) -> None:
    assert state["n_fp32"] > 0 and state["n_moments"] > 0  # there was optimizer state to compare
    assert {k: v for k, v in state.items() if not k.startswith("n_")} == {
        "full": True, "shards": True, "fp32": True, "moments": True, "steps": True, "lr": True}


def test_zero3_greedy_equals_unsharded_generation(dist_results):
    for r in dist_results:
        assert r["partitioned_at_start"]
        assert r["greedy_has_eos"]  # the comparison covers sequences that stop early (pads after EOS)
        assert r["greedy_equal"]
        assert r["trained_weights_equal"] and r["trained_greedy_equal"]


def test_zero3_generation_leaves_training_state_bit_identical(dist_results):
    for r in dist_results:
        _state_identical(r["state_after_generate"])
        assert r["param_status_unchanged"]  # ZeRO-3 parameter states (gathered or not) as generation found them
        assert r["train_forward_equal"]


def test_gather_group_size_one_vs_all(dist_results):
    for r in dist_results:
        assert r["flat_gather_used"] and not r["lora_flat_gather_used"]  # both sync paths are exercised
        assert r["flat_equals_gathered_parameters"]
        assert r["group_sizes"][0] == 1 and r["group_sizes"][1] > 1
        assert r["group_copy_equal"] and r["group_tokens_equal"]


def test_ranks_with_different_prompts_and_lengths_do_not_hang(dist_results):
    r0, r1 = dist_results
    assert all(w0 != w1 for w0, w1 in zip(r0["ragged_widths"], r1["ragged_widths"]))  # really ragged across ranks
    assert len(r0["ragged_lengths"][0]) != len(r1["ragged_lengths"][0])
    assert r0["ragged_seconds"] < 120


def test_scoring_forward_keeps_zero3_training_order(dist_results):
    for r in dist_results:
        # without forward_only_pass_done each round's backward drops a forward-only recording: [False, False, False]
        assert r["trace_complete"] == [False, True, True]  # the first training pass records, the later ones follow
        # the first scoring forward records and releases layer by layer; later ones keep the model gathered for the
        # backward (DeepSpeed's zero3_max_reuse_distance is above its size), which releases all of it
        assert r["trace_gathered_after_scoring"] == [0.0, 1.0, 1.0]
        assert r["trace_gathered_after_training"] == [0.0, 0.0, 0.0]


def test_sharded_ema_and_swap_back(dist_results):
    for r in dist_results:
        assert r["ema_max_diff"] == 0.0  # shard-wise EMA == EMA of the gathered weights
        assert r["ema_differs_from_weights"] == r["ema_tensors"]
        _state_identical(r["state_after_ema_swap"])


def test_lora_fused_generation_equals_merged_model(dist_results):
    for r in dist_results:
        assert r["lora_adapters"] > 0 and r["lora_adapter_nonzero_delta"] > 0 and not r["lora_load_unexpected"]
        assert r["lora_vs_base_logit_diff"] > 1e-2  # the adapters matter for the output...
        assert r["lora_logit_diff"] < 1e-5  # ...and the fused copy equals peft's merge
        assert r["lora_greedy_equal"]
        _state_identical(r["lora_state_after_generate"])
