"""Backbones and policies, the RewardEnsemble, aggregation rules."""

import warnings

# peft (0.21) reads transformers' deprecated `is_gradient_checkpointing` on every adapter it creates or
# loads; the FutureWarning is about peft's code, not the user's, and repeats per adapter.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
