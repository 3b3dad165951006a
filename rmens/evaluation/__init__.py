"""Evaluation: judges, AlpacaEval win rates, MT-Bench, reward-model metrics, overoptimisation curves."""
