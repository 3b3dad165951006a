"""The reward ensemble's MLflow pyfunc, as a models-from-code file: `mlflow.pyfunc.log_model` stores this
source file with the model instead of a CloudPickle of a Python object, so loading the model never
unpickles anything. predict(DataFrame[prompt, response]) -> DataFrame[reward, member_0 .. member_{k-1}, std].

The member columns are the standardised members (each mean 0, sd 1 over training responses, statistics saved
with the ensemble) that the rule aggregated into `reward`, and `std` is their spread: what Best-of-n and PPO
optimise. An ensemble of several members saved without the statistics refuses to load (see rmens.reward).
"""

from __future__ import annotations

import mlflow
import pandas as pd


class RewardEnsembleModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from rmens.models.config import AggregationConfig
        from rmens.reward import EnsembleReward

        aggregation = AggregationConfig.model_validate((context.model_config or {}).get("aggregation", {}))
        self.reward = EnsembleReward.from_folder(context.artifacts["ensemble"], aggregation)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from rmens.models.aggregate import member_std

        missing = {"prompt", "response"} - set(model_input.columns)
        if missing:
            raise ValueError(f"input needs columns prompt and response; missing {sorted(missing)}")
        out = self.reward(model_input["prompt"].tolist(), model_input["response"].tolist())
        frame = pd.DataFrame({"reward": out.scores.tolist()})
        for i, member in enumerate(out.members):
            frame[f"member_{i}"] = member.tolist()
        frame["std"] = member_std(out.members).tolist()
        return frame


mlflow.models.set_model(RewardEnsembleModel())
