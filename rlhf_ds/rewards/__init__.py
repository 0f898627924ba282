"""Reward sources for PPO/GRPO: a reward model in the step (`reward.model`), a Python function (`reward.function`),
a served reward model (`reward.url`), sources plugins register (`reward.registered`) and a multi-turn environment's
rewards, summed with weights (`reward.weights`) by `WeightedReward`; `build_reward` builds them from the config."""
from rlhf_ds.rewards.base import SOURCES, EnvironmentReward, RewardBatch, RewardError, RewardSource, WeightedReward
from rlhf_ds.rewards.function import FunctionReward
from rlhf_ds.rewards.remote import RemoteReward

__all__ = ["FunctionReward", "RemoteReward", "RewardBatch", "RewardError", "RewardSource", "WeightedReward",
           "build_reward"]


def build_reward(cfg, reward_engine, tokenizer, reward_tokenizer) -> WeightedReward:
    """The weighted sum of the reward sources the config names (rlhf_ds/rewards/: one file per kind; reward.registered:
    the sources plugins register, built from their options)."""
    from rlhf_ds.rewards.model import ModelReward  # DeepSpeed engines: imported only when a step builds rewards

    r, parts = cfg.reward, []
    if reward_engine is not None:
        parts.append(("model", ModelReward(reward_engine, tokenizer, reward_tokenizer, cfg.ppo.micro_batch_size,
                                           cfg.data.max_prompt_tokens, cfg.response_tokens(),
                                           cfg.ppo.packing)))
    if r.function:
        parts.append(("function", FunctionReward(r.function)))
    if r.url:
        parts.append(("remote", RemoteReward(r.url, r.timeout_s, r.retries, r.backoff_s, r.batch_size, r.token_file)))
    parts += [(name, SOURCES.get(name)(**options)) for name, options in r.registered.items()]
    if cfg.rollout.environment:
        parts.append(("environment", EnvironmentReward()))
    return WeightedReward([(name, float(r.weights.get(name, 1.0)), source) for name, source in parts])
