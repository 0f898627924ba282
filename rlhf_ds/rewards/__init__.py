"""Reward sources for PPO/GRPO: a reward model in the step (`reward.model`), a Python function (`reward.function`)
and a served reward model (`reward.url`), summed with weights (`reward.weights`) by `WeightedReward`."""
from rlhf_ds.rewards.base import RewardBatch, RewardError, RewardSource, WeightedReward
from rlhf_ds.rewards.function import FunctionReward
from rlhf_ds.rewards.remote import RemoteReward

__all__ = ["FunctionReward", "RemoteReward", "RewardBatch", "RewardError", "RewardSource", "WeightedReward"]
