"""Multi-turn, tool-using rollouts (issue #23): environments from outside the package (tests/env_ext.py), the tag
format and calculator of envs/tools.py, the built-in `tool_use` environment.

* tools: calls parsed from `<tool>NAME: ARGS</tool>`; a malformed call, an unknown tool, one that raises, one past
  its timeout each become a `<result>error: ...</result>` observation with its status, never an exception;
* episodes through a real HybridEngine (a tiny GPT-2, in-process): model turns and environment tokens interleave,
  the environment's tokens are attended to and never actions, rewards add up, `max_turns` / `max_total_tokens` cut;
* masking: environment tokens carrying a huge fake log-ratio, advantage and value change neither the PPO losses nor
  their gradients;
* 2 ranks under the deepspeed launcher, ZeRO-3: one rank's episodes end at turn 1, the other's at turn 4; the step
  finishes (timed) and a SIGTERM-interrupted run resumes bit-identically;
* bad input at the CLI: an unknown environment, options it does not take (exit 2, before any model loads); an
  environment that raises in reset or returns a wrong type (exit 1, one line naming it and the prompt row).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time

import pytest
import torch

from conftest import REPO, ppo_metrics_by_step, ppo_resume_args, read_metrics, run_cli
from dist_hybrid_models import tiny_models
from test_resume import assert_same_run, stop_after_step_2_then_resume

from rlhf_ds.envs import ENVIRONMENTS, TOOLS, ToolUse
from rlhf_ds.envs.tools import calculator, find_call, run_call
from rlhf_ds.registry import load_plugins

ENV_EXT = os.path.join(REPO, "tests", "env_ext.py")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    return tiny_models(tmp_path_factory)


@pytest.fixture
def env_ext():
    """tests/env_ext.py's environments registered for this test only (the registry restored afterwards)."""
    saved, modules = dict(ENVIRONMENTS._entries), set(sys.modules)
    load_plugins([ENV_EXT])
    yield
    ENVIRONMENTS._entries = saved
    for name in set(sys.modules) - modules:
        if getattr(sys.modules[name], "__file__", None) == ENV_EXT:
            del sys.modules[name]


# ---- tools -----------------------------------------------------------------------------------------------------------
def test_tool_calls_are_parsed_from_tags_and_every_failure_is_an_observation():
    assert find_call("so <tool>calculator: 37 * 12</tool> then") == ("calculator", "37 * 12")
    assert find_call("the answer is 4 .") is None
    assert "never closed" in find_call("<tool>calculator: 3 + 4")
    assert find_call("<tool>no colon here</tool>") == "expected <tool>NAME: ARGUMENTS</tool>"
    assert [calculator(e) for e in ("37 * 12", "(3 + 4) x 2", "7 / 2", "2 ^ 10", "-5 // 2")] == \
        ["444", "14", "3.5", "1024", "-3"]

    tools = ["calculator"]
    ok = run_call(("calculator", "37*12"), tools, 1.0)
    assert (ok.status, ok.observation) == ("ok", "<result>444</result>")
    cases = {"malformed": "expected <tool>NAME: ARGUMENTS</tool>", "unknown_tool": ("search", "fox"),
             "error": ("calculator", "1 / 0")}
    for status, call in cases.items():
        out = run_call(call, tools, 1.0)
        assert out.status == status and out.observation.startswith("<result>error: "), (status, out)
    assert "ZeroDivisionError" in run_call(("calculator", "1 / 0"), tools, 1.0).observation
    for bounded in ("9 ** 999", "import os", "__import__('os')", "10 ** 40"):  # bounded work, no code
        assert run_call(("calculator", bounded), tools, 1.0).status == "error", bounded

    TOOLS.register("sleepy", lambda args: time.sleep(5))
    try:
        t0 = time.time()
        out = run_call(("sleepy", ""), ["sleepy"], 0.2)
        assert out.status == "timeout" and "timed out after 0.2 s" in out.observation
        assert time.time() - t0 < 2
    finally:
        del TOOLS._entries["sleepy"]


def test_tool_use_environment_runs_the_call_then_checks_the_answer():
    env = ToolUse(observation_template=" {result} ")
    env.reset({"prompt": "what is 37 times 12 ?", "answer": 444})
    step = env.step("<tool>calculator: 37 * 12</tool>")
    assert (step.observation, step.reward, step.done) == (" <result>444</result> ", None, False)
    assert step.info == {"tool_calls": 1.0, "tool_ok": 1.0}
    assert env.step("<tool>calculator: 37 *</tool>").info == {"tool_calls": 1.0, "tool_error": 1.0}
    end = env.step("it is 444 .")
    assert (end.reward, end.done) == (1.0, True)
    env.reset({"answer": "444"})
    assert env.step("it is 443 .").reward == 0.0 and env.step("no number").reward == 0.0
    with pytest.raises(KeyError, match="no 'answer' column"):
        env.reset({"question": "x"})


def test_tool_task_demonstrations_are_token_for_token_what_an_episode_builds(models):
    """An SFT demonstration calling the tool, tokenized whole, is the model's call, then the default observation, then
    the answer: the episode shows the model exactly the tokens it learned to continue from."""
    from rlhf_ds.data.tool_task import ToolTask
    from rlhf_ds.models.loading import load_tokenizer

    tok = load_tokenizer(models["gpt2"])

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    for row in ToolTask(0).sft_rows(20, tool_share=1.0):
        call = row["response"][: row["response"].index("</tool>") + len("</tool>")]
        env = ToolUse()
        env.reset({"answer": 0})
        observation = env.step(call).observation
        demo, call_ids, observation_ids = ids(row["response"]), ids(call), ids(observation)
        assert demo[: len(call_ids)] == call_ids, row
        assert demo[len(call_ids) : len(call_ids) + len(observation_ids)] == observation_ids, row


def test_a_stop_string_ends_the_model_turn_and_reported_keys_must_be_declared(models):
    from rlhf_ds.envs.base import EnvironmentFailure, EnvStep
    from rlhf_ds.models.loading import load_tokenizer
    from rlhf_ds.rollout.multi_turn import _Episode

    tok = load_tokenizer(models["gpt2"])
    ep = _Episode("tool_use", ToolUse, {"answer": 3}, "what is 1 plus 2 ?")
    sampled = tok("<tool>calculator: 1 + 2</tool> and then more", add_special_tokens=False)["input_ids"]
    turn = ep.end_of_turn(sampled + [tok.eos_token_id], tok.eos_token_id, tok)
    assert tok.decode(turn) == "<tool>calculator: 1 + 2</tool>" and turn == sampled[:len(turn)]
    assert ep.stopped and not ep.has_eos
    plain = tok("the answer is 3 .", add_special_tokens=False)["input_ids"] + [tok.eos_token_id, 7, 7]
    assert ep.end_of_turn(plain, tok.eos_token_id, tok) == plain[:-2] and ep.has_eos and not ep.stopped
    assert ep.step("<tool>calculator: 1 + 2</tool>").observation == " <result>3</result>"  # the default template
    assert ep.info["tool_calls"] == 1 and ep.info["tool_ok"] == 1 and ep.info["tool_timeout"] == 0

    class Undeclared:
        def reset(self, row):
            pass

        def step(self, turn):
            return EnvStep(observation="x", info={"surprise": 1})

    with pytest.raises(EnvironmentFailure, match="info key 'surprise' .* is not among its info_keys"):
        _Episode("undeclared", Undeclared, {}, "p").step("hello")


def test_episodes_and_dynamic_sampling_refuse_an_engine_that_does_not_decode_rank_locally(models):
    from rlhf_ds.config import ConfigError
    from rlhf_ds.rollout.base import require_rank_local

    _, _, hybrid = tiny_engine(models)
    require_rank_local(hybrid, ["rollout.environment", "ppo.dynamic_sampling"])  # the portable copy: rank-local

    class PluginEngine:  # a backend that says nothing about its generate
        pass

    require_rank_local(PluginEngine(), [])  # single-turn rollouts need nothing
    with pytest.raises(ConfigError, match="rollout.environment call the rollout engine a different number of times on "
                                          "each rank, but PluginEngine does not decode rank-locally"):
        require_rank_local(PluginEngine(), ["rollout.environment"])
    hybrid.backend = "deepspeed"  # DeepSpeed's hybrid engine gathers ZeRO-3 shards inside generate
    with pytest.raises(ConfigError, match="ppo.dynamic_sampling"):
        require_rank_local(hybrid, ["ppo.dynamic_sampling"])


# ---- episodes through a real engine ----------------------------------------------------------------------------------
def tiny_engine(models):
    from transformers import AutoModelForCausalLM

    from rlhf_ds.models.loading import load_tokenizer
    from rlhf_ds.rollout.hybrid import HybridEngine

    model = AutoModelForCausalLM.from_pretrained(models["gpt2"], dtype=torch.float32).eval()
    tok = load_tokenizer(models["gpt2"])
    engine = HybridEngine(model, tok.pad_token_id, tok.eos_token_id)
    engine.sync_weights()
    return model, tok, engine


def episodes(models, turns: list[int], max_turns: int = 4, max_total_tokens: int = 200, new_tokens: int = 6):
    from rlhf_ds.config import GenerationConfig
    from rlhf_ds.rollout.multi_turn import EpisodeLimits, multi_turn_rollout

    model, tok, engine = tiny_engine(models)
    prompts = [f"human : describe the fox number {i} . assistant :" for i in range(len(turns))]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    rows = [{"turns": k, "id": i} for i, k in enumerate(turns)]
    torch.manual_seed(0)
    batch = multi_turn_rollout(engine, "scripted", ENVIRONMENTS.get("scripted"), ids, prompts, rows,
                               GenerationConfig(new_tokens), tok, EpisodeLimits(max_turns, max_total_tokens))
    return model, tok, batch


def segments(mask_row: list[int]) -> list[tuple[int, int]]:
    """(value, run length) of a 0/1 row."""
    out = []
    for v in mask_row:
        if out and out[-1][0] == v:
            out[-1] = (v, out[-1][1] + 1)
        else:
            out.append((v, 1))
    return out


def test_episodes_interleave_model_turns_and_environment_tokens(models, env_ext):
    model, tok, batch = episodes(models, [1, 2, 4, 6], max_turns=4)
    P = batch.prompt_len
    assert batch.env_rewards.tolist() == [0.25, 0.5, 1.0, 1.0]  # the 6-turn episode stops at max_turns=4
    assert batch.env_stats["env_max_turns_rate"] == 0.25 and batch.env_stats["env_done_rate"] == 0.75
    assert batch.env_stats["env_turns"] == (1 + 2 + 4 + 4) / 4
    for i, turns in enumerate([1, 2, 4, 4]):
        attn, act = batch.attention_mask[i, P:].tolist(), batch.action_mask[i, P:].tolist()
        real = sum(attn)
        assert all(attn[:real]) and not any(attn[real:]) and not any(act[real:])  # one block, then padding
        runs = segments(act[:real])
        assert [v for v, _ in runs] == [1, 0] * (turns - 1) + [1]  # model turn, environment, model turn, ...
        tokens = batch.sequences[i, P:].tolist()
        pos = 0
        for n, (v, length) in enumerate(runs):
            if v == 0:  # the environment's tokens: its observation, after an EOS it adds when the turn was cut
                text = tok.decode(tokens[pos:pos + length], skip_special_tokens=True)
                assert text == f" obs {(n + 1) // 2} :", text
            pos += length
        assert f" obs {turns - 1} :" in batch.responses[i] if turns > 1 else "obs" not in batch.responses[i]

    # the token budget of an episode cuts it: model and environment tokens together
    _, _, short = episodes(models, [6], max_turns=6, max_total_tokens=9, new_tokens=4)
    assert short.attention_mask[0, short.prompt_len:].sum() == 9
    assert short.env_stats["env_max_total_tokens_rate"] == 1.0


def test_environment_tokens_change_neither_the_losses_nor_their_gradients(models, env_ext):
    from rlhf_ds.config import PPOAlgoConfig
    from rlhf_ds.rl.experience import sequence_logprobs
    from rlhf_ds.rl.update import actor_loss, critic_loss

    model, tok, batch = episodes(models, [3, 2, 4])
    P = batch.prompt_len
    m = batch.response_mask.float()
    env = (batch.attention_mask[:, P:] == 1) & (m == 0)  # inserted by the environment
    assert env.sum() > 10
    g = torch.Generator().manual_seed(1)
    base = {"sequences": batch.sequences, "attention_mask": batch.attention_mask, "action_mask": m,
            "old_logp": -torch.rand(m.shape, generator=g) * m, "ref_logp": -torch.rand(m.shape, generator=g) * m,
            "advantages": torch.randn(m.shape, generator=g) * m, "returns": torch.randn(m.shape, generator=g) * m,
            "old_values": torch.randn(m.shape, generator=g) * m}
    huge = dict(base)
    huge["old_logp"] = torch.where(env, torch.full_like(m, -60.0), base["old_logp"])  # log-ratio about +60
    huge["ref_logp"] = torch.where(env, torch.full_like(m, -1e4), base["ref_logp"])
    for k in ("advantages", "returns", "old_values"):
        huge[k] = torch.where(env, torch.full_like(m, 1e6), base[k])
    p = PPOAlgoConfig(kl_loss_coef=0.1, value_clip=0.2)

    def losses(mb):
        model.zero_grad()
        logp, entropy = sequence_logprobs(model, mb["sequences"], mb["attention_mask"], P, 1.0, with_entropy=True)
        values = torch.tanh(logp) * 3  # a value head on the same graph
        loss, figures = actor_loss(logp, entropy, mb, p, 24)
        vf, vf_figures = critic_loss(values, mb, p)
        (loss + vf).backward()
        return loss.item(), vf.item(), figures, vf_figures, [q.grad.clone() for q in model.parameters()]

    a, b = losses(base), losses(huge)
    assert a[:4] == b[:4]  # losses and figures exactly equal
    assert all(torch.equal(x, y) for x, y in zip(a[4], b[4]))
    assert any(x.abs().sum() > 0 for x in a[4])
    # the same garbage on a model token does change them: the test can fail
    poisoned = dict(base, advantages=base["advantages"] + 1e6 * (m * (torch.arange(m.shape[1]) == 0)))
    assert losses(poisoned)[0] != a[0]


# ---- 2 ranks, different turn counts, dynamic sampling, resume -----------------------------------------------------
MT_ARGS = [f"plugins=[{ENV_EXT}]", "rollout.environment=scripted", "rollout.environment_options.turns_by_rank=[1,4]",
           "rollout.max_turns=4", "generation.max_new_tokens=6", "rollout.max_total_tokens=48"]
PARITY = '''
def parity(prompts, responses, **columns):
    """1 for an even number of characters: some groups of 4 have no signal."""
    return [float(len(r) % 2 == 0) for r in responses]
'''


def test_ranks_with_different_turn_counts_resample_finish_and_resume_bit_identically(models, tmp_path, monkeypatch):
    """Rank 0's episodes end at turn 1, rank 1's at turn 4; with dynamic sampling on (rank-local extra rounds of
    episodes) and a parity rule besides the environment's reward. Also the resume test of dynamic sampling (#26)."""
    record = tmp_path / "record"
    record.mkdir()
    monkeypatch.setenv("ENV_EXT_RECORD", str(record))
    (tmp_path / "rules.py").write_text(PARITY)
    extra = [*MT_ARGS, "reward.model=null", f"reward.function={tmp_path / 'rules.py'}:parity",
             "ppo.dynamic_sampling=true", "ppo.dynamic_sampling_max_rounds=2", "ppo.n_samples_per_prompt=4",
             "ppo.micro_batch_size=4"]
    reference = str(tmp_path / "reference")
    t0 = time.time()
    run_cli(ppo_resume_args(models, reference, *extra, estimator="grpo"), ranks=2, timeout=400)
    seconds = time.time() - t0
    turns = {r: {json.loads(line)["turns"] for line in open(record / f"rank{r}.jsonl")} for r in (0, 1)}
    assert turns == {0: {1}, 1: {4}}, turns  # no hang although rank 1 decodes four times as often per step
    rows = ppo_metrics_by_step(reference)
    assert all(r["ppo/env_turns"] == 2.5 and r["ppo/env_done_rate"] == 1.0 for r in rows.values())
    # groups without signal were dropped and replaced: extra rounds ran and the trained batches lost most of them
    assert sum(r["ppo/ds_extra_rounds"] for r in rows.values()) > 0
    assert sum(r["ppo/zero_signal_groups"] for r in rows.values()) < sum(r["ppo/ds_zero_signal_sampled"]
                                                                         for r in rows.values())
    print(f"2 ranks, turns 1 vs 4, {len(rows)} GRPO steps: {seconds:.1f} s including start-up")

    out = str(tmp_path / "interrupted")
    stop_after_step_2_then_resume(ppo_resume_args(models, out, *extra, estimator="grpo"), out)
    assert_same_run(reference, out)  # every step figure and the saved weights, exactly


# ---- bad input -------------------------------------------------------------------------------------------------------
def grpo_args(models, out: str, *extra: str) -> list[str]:
    return ["ppo", f"output_dir={out}", f"actor.model={models['gpt2']}", "reward.model=null",
            f"plugins=[{ENV_EXT}]", "ppo.advantage_estimator=grpo", "ppo.n_samples_per_prompt=2",
            "ppo.rollout_batch_size=2", "ppo.micro_batch_size=4", "ppo.steps=1", "generation.max_new_tokens=6",
            "data.max_seq_len=64", "checkpoint.every_minutes=0", *extra]


@pytest.mark.parametrize("extra, code, says", [
    (["rollout.environment=no_such_env"], 2, "rollout.environment: unknown environment 'no_such_env'; registered: "
                                             "tool_use, scripted, broken"),
    (["rollout.environment=broken", "rollout.environment_options.fail_on=reset"], 2,
     "rollout.environment_options ['fail_on'] do not fit environment 'broken'"),
    (["rollout.environment=scripted", "hybrid.tp_size=2"], 2, "decodes collectively"),
    (["rollout.environment=broken", "rollout.environment_options.fail_in=reset"], 1,
     "environment 'broken' raised in reset on prompt row "),
    (["rollout.environment=broken", "rollout.environment_options.fail_in=type"], 1,
     "environment 'broken': step returned dict on prompt row "),
    (["rollout.environment=broken", "rollout.environment_options.fail_in=silent"], 1,
     "neither ended the episode (done=True) nor gave an observation"),
])
def test_environment_bad_input_exits_with_one_line(models, tmp_path, extra, code, says):
    out = str(tmp_path / "run")
    proc = run_cli(grpo_args(models, out, *extra), check=False)
    err = proc.stderr
    assert proc.returncode == code, proc.stdout[-2000:] + err[-2000:]
    lines = re.findall(r"rlhf-ds ppo: [^\r\n]*", err)  # (after a progress bar's carriage return)
    assert len(lines) == 1 and says in lines[0], err[-3000:]
    assert "Traceback" not in err
    assert not os.path.exists(os.path.join(out, "model"))
    if code == 2:
        assert not os.path.exists(os.path.join(out, "metrics.jsonl"))


def test_an_environment_that_never_ends_is_cut_at_max_turns_and_said(models, tmp_path):
    out = str(tmp_path / "run")
    proc = run_cli(grpo_args(models, out, "rollout.environment=scripted",
                             "rollout.environment_options.turns_by_rank=[9]", "rollout.max_turns=2"))
    assert "environment 'scripted': 4 of 4 episodes reached rollout.max_turns=2 without ending (first: prompt row" \
        in proc.stdout + proc.stderr
    rows = [r for r in read_metrics(out) if "ppo/env_turns" in r]
    assert rows and all(r["ppo/env_turns"] == 2 and r["ppo/env_max_turns_rate"] == 1.0 for r in rows)
    assert all(r["ppo/task_reward"] == 0.5 for r in rows)  # two turns' rewards: scored as they stand
