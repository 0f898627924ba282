"""Tensor-parallel generation (`hybrid.tp_size` > 1, rlhf_ds/rollout/tensor_parallel.py).

In-process: which families are refused and how, how ranks form TP groups. On 2 CPU ranks under ZeRO-3, tp_size 2
(`tests/dist_tensor_parallel.py` through the deepspeed launcher): greedy tokens equal the whole-copy HybridEngine's,
each rank's copy holds about half of the decoder-layer parameters, the streamed slices equal AutoTP's own partition,
building the copy allocates only the slices, the training state is bit-identical afterwards, ranks with different
prompts get answers to their own, and the other declared families (mistral, qwen2) decode like the whole copy.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, cli_env, free_port
from dist_hybrid_models import tiny_models


def test_gpt2_and_unknown_families_are_refused_naming_the_supported_ones():
    from rlhf_ds.rollout.tensor_parallel import TP_FAMILIES, check_tp_supported

    assert "llama" in TP_FAMILIES
    for family in TP_FAMILIES:
        check_tp_supported(family)
    with pytest.raises(ValueError) as err:
        check_tp_supported("gpt2")
    msg = str(err.value)
    assert "'gpt2'" in msg and "AutoTP" in msg and "kernel injection" in msg and "tp_size=1" in msg
    assert all(f in msg for f in TP_FAMILIES)
    with pytest.raises(ValueError, match="supports llama"):
        check_tp_supported("bloom")


def test_engine_refuses_a_gpt2_actor_at_construction():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf_ds.rollout.tensor_parallel import TensorParallelEngine

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(ValueError, match="does not support 'gpt2' models.*llama"):
        TensorParallelEngine(model, 0, 1, tp_size=2)


def test_tp_groups_are_consecutive_ranks_within_a_node():
    from rlhf_ds.rollout.tensor_parallel import tp_group_ranks

    assert tp_group_ranks(2, 2, 2) == [[0, 1]]
    assert tp_group_ranks(8, 4, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert tp_group_ranks(8, 4, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert tp_group_ranks(4, 2, 1) == [[0], [1], [2], [3]]
    for world, local, tp in ((4, 2, 4), (6, 6, 4), (2, 2, 3), (2, 2, 0)):  # across nodes, not a divisor, nonsense
        with pytest.raises(ValueError, match="tp_size"):
            tp_group_ranks(world, local, tp)


# ---------------------------------------------------------------------------------------------------------------------
# ZeRO-3 on 2 ranks, tp_size 2
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dist_results(tmp_path_factory) -> list[dict]:
    models = tiny_models(tmp_path_factory)
    out = str(tmp_path_factory.mktemp("tensor_parallel") / "results.json")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--no_local_rank", "--master_port",
           str(free_port()), os.path.join(REPO, "tests", "dist_tensor_parallel.py"), os.path.dirname(models["llama"]), out]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(threads=1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    res = []
    for r in range(2):
        with open(f"{out}.{r}", encoding="utf-8") as f:
            res.append(json.load(f))
    assert all(r["world"] == 2 and r["threads"] == 1 and r["tp_group"] == [0, 1] for r in res)
    return res


def test_greedy_tokens_equal_the_whole_copy(dist_results):
    for r in dist_results:
        assert r["fresh_has_eos"] and r["fresh_greedy_equal"]  # responses that stop early (pads after EOS) included
        assert r["greedy_equal"], r["greedy_shape"]  # after optimizer steps (the sync reads the trained shards)
        assert r["after_train_greedy_equal"]  # and again after another step: every generate re-syncs
        assert r["lora_greedy_equal"]  # LoRA actor: adapters fused into the streamed weights


def test_each_rank_holds_about_half_of_the_layers(dist_results):
    for r in dist_results:
        whole, tp = r["count_whole"], r["count_tp"]
        assert 0.49 <= tp["layers"] / whole["layers"] <= 0.52, (tp, whole)
        assert r["copy_bytes_tp"] < r["copy_bytes_whole"]
    # the two slices tile the layers; only the per-layer RMSNorm weights (2 x 64 per layer) are held by both ranks
    both = dist_results[0]["count_tp"]["layers"] + dist_results[1]["count_tp"]["layers"]
    assert both - dist_results[0]["count_whole"]["layers"] == 2 * 2 * 64
    split = dist_results[0]["split_params"]
    assert {n.rsplit(".", 2)[-2] for n in split if ".layers." in n} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_streamed_slices_equal_autotps_own_partition(dist_results):
    for r in dist_results:
        assert r["autotp_names_equal"] and r["autotp_mismatch"] == [] and r["autotp_buffers_equal"]


def test_building_the_copy_allocates_only_its_slices(dist_results):
    """Meta device -> AutoTP -> to_empty: the bytes allocated while building are the slice-only copy's, and no single
    allocation is larger than the largest tensor the copy holds whole (the embedding)."""
    for r in dist_results:
        assert r["build_alloc_bytes"] == r["copy_bytes_tp"] < r["copy_bytes_whole"]
        assert r["build_largest_alloc"] <= 512 * 64 * 4


def test_training_state_is_bit_identical_after_tp_generation(dist_results):
    for r in dist_results:
        state = r["state_after_generate"]
        assert state["n_fp32"] > 0 and state["n_moments"] > 0
        assert {k: v for k, v in state.items() if not k.startswith("n_")} == {
            "full": True, "shards": True, "fp32": True, "moments": True, "steps": True, "lr": True}


def test_each_rank_gets_answers_to_its_own_prompts(dist_results):
    r0, r1 = dist_results
    assert r0["ragged_shape"][0] != r1["ragged_shape"][0]  # other batch sizes and prompt widths per rank
    for r in dist_results:
        (b, p), (b_out, _) = r["ragged_shape"]
        assert b_out == b and r["ragged_prompt_len"] == p and r["ragged_prompts_kept"]
        assert r["ragged_greedy_equal"]
    # sampling: the group decoded one batch (both ranks' prompts), identically on both TP ranks
    assert r0["group_batch_shapes"][0][0] == r0["ragged_shape"][0][0] + r1["ragged_shape"][0][0]
    assert r0["group_batch_identical"]
    # under the leader's RNG: the leader's generator advanced, the other rank's was left as it was
    leader, other = (r0, r1) if r0["is_leader"] else (r1, r0)
    assert not leader["rng_unchanged"] and other["rng_unchanged"]


def test_other_declared_families_decode_like_the_whole_copy(dist_results):
    from rlhf_ds.rollout.tensor_parallel import TP_FAMILIES

    for r in dist_results:
        fam = r["families"]
        assert set(fam) | {"llama"} == set(TP_FAMILIES)
        assert all(f["greedy_equal"] for f in fam.values())
        assert fam["mistral"]["split"] == 15  # 7 projections x 2 layers + the LM head
        assert fam["qwen2"]["copy_released"]  # keep_copy=False
