"""rmens as a part of other RL engines: the ensemble's reward in the shape each expects (trl.py: TRL's reward
functions). The engines themselves are optional: nothing here imports them."""
