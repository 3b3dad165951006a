"""PPO settings; defined in rmens.config with every other stage config and re-exported here."""

from rmens.config import PolicyLoraSettings, PPOConfig, PPOJobConfig

__all__ = ["PPOConfig", "PPOJobConfig", "PolicyLoraSettings"]
