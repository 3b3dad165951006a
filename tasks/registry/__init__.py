"""The model registry: the reward ensemble registered and served as an MLflow pyfunc model.

    model.py              logs an ensemble folder as a pyfunc model from code, registers it and sets aliases;
                          downloads a registered model's ensemble folder (weights only, no stored code runs)
    reward_model_code.py  the pyfunc itself, a models-from-code file: MLflow stores its source with the model
                          (it is not imported here: importing it sets MLflow's current model)
    promotion.py          scores registered versions on held-out pairs and moves the champion aliases, deciding
                          once per candidate version
"""

from tasks.registry.model import ENSEMBLE_ARTIFACT, MODEL_CODE, download_ensemble, log_and_register
from tasks.registry.promotion import (
    Decision,
    champion_version,
    decide,
    decide_once,
    promote_if_better,
    score_registered,
)

__all__ = ["ENSEMBLE_ARTIFACT", "MODEL_CODE", "Decision", "champion_version", "decide", "decide_once",
           "download_ensemble", "log_and_register", "promote_if_better", "score_registered"]
