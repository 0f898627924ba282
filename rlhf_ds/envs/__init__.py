"""Multi-turn environments and the tools they run (`rollout.environment`); importing this registers the built-ins."""
from rlhf_ds.envs.base import ENVIRONMENTS, EnvironmentFailure, EnvStep
from rlhf_ds.envs.tool_use import ToolUse
from rlhf_ds.envs.tools import TOOLS

__all__ = ["ENVIRONMENTS", "EnvironmentFailure", "EnvStep", "TOOLS", "ToolUse"]
