"""The reference experiment: do reward-model ensembles help, judged by AlpacaEval's own verdicts?

    from rmens.experiment.config import load_experiment
    from rmens.experiment.runner import run_experiment
    run_experiment(load_experiment("tiny"), "runs/experiment-tiny")

See rmens.experiment.plan for the steps and rmens/presets/experiment/ for the sizes.
"""
