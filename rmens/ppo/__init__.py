"""PPO for language models with ensemble rewards."""
