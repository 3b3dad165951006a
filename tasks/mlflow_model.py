"""The reward ensemble as an MLflow pyfunc model: prompts and responses in, member and aggregated
rewards out. Logged and registered by the train_ensemble task."""

from __future__ import annotations

import mlflow
import pandas as pd


class RewardEnsembleModel(mlflow.pyfunc.PythonModel):
    """predict(DataFrame[prompt, response]) -> DataFrame[reward, member_0 .. member_{k-1}, std]."""

    def load_context(self, context) -> None:
        from rmens.config import AggregationConfig
        from rmens.reward import EnsembleReward

        aggregation = AggregationConfig.model_validate((context.model_config or {}).get("aggregation", {}))
        self.reward = EnsembleReward.from_folder(context.artifacts["ensemble"], aggregation)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        missing = {"prompt", "response"} - set(model_input.columns)
        if missing:
            raise ValueError(f"input needs columns prompt and response; missing {sorted(missing)}")
        out = self.reward(model_input["prompt"].tolist(), model_input["response"].tolist())
        frame = pd.DataFrame({"reward": out.scores.tolist()})
        for i, member in enumerate(out.members):
            frame[f"member_{i}"] = member.tolist()
        frame["std"] = out.members.std(dim=0, unbiased=False).tolist()
        return frame


def log_and_register(ensemble_dir: str, registered_name: str | None, aliases: list[str], aggregation: dict):
    """Log the ensemble folder as a pyfunc model in the active run; register it and set aliases."""
    example = pd.DataFrame({"prompt": ["What is 2 + 2?"], "response": ["4"]})
    info = mlflow.pyfunc.log_model(
        name="reward_ensemble", python_model=RewardEnsembleModel(), artifacts={"ensemble": ensemble_dir},
        model_config={"aggregation": aggregation}, pip_requirements=["rmens"],
        signature=mlflow.models.infer_signature(example, pd.DataFrame({"reward": [0.0], "std": [0.0]})),
    )
    version = None
    if registered_name:
        version = mlflow.register_model(info.model_uri, registered_name).version
        client = mlflow.MlflowClient()
        for alias in aliases:
            client.set_registered_model_alias(registered_name, alias, version)
    return info.model_uri, version
