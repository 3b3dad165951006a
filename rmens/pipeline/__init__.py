"""The pipeline: data -> gold -> reward-model arms (every run) -> Best-of-n -> PPO -> evaluation -> comparison.

Its steps are library functions declared with rmens.steps.step beside their code (data, reward_models,
sampling, policy, evaluate, comparison); rmens.pipeline.plan orders them once. The plain runner
(rmens.steps.runner) and the Prefect flows (flows/pipeline.py through tasks/steps.py) run the same plan.
"""
