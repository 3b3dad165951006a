"""verl's custom reward function that asks `rmens serve` for the ensemble's reward: one HTTP call per batch.

    rmens serve runs/ensemble --rule lcb1 --port 5100 &
    python -m verl.trainer.main_ppo ... reward_model.reward_manager=batch \
        custom_reward_function.path=examples/verl_reward.py custom_reward_function.name=compute_score

verl's batch reward manager passes each batch's decoded responses (`solution_strs`) and the rows'
`extra_info`; the prompt a response answers must be in `extra_info["prompt"]` (put it there when the dataset
is prepared: verl does not pass prompts to reward functions). RMENS_REWARD_URL (default
http://127.0.0.1:5100) and RMENS_REWARD_TOKEN (when the server has one) say where the server is;
RMENS_REWARD_CHUNK (default 256, the server's --max-batch) how many responses go in one request. Only the
standard library is imported: verl loads this file by path in its own environment.
"""

from __future__ import annotations

import json
import os
import urllib.request


def compute_score(data_sources: list, solution_strs: list[str], ground_truths: list, extra_infos: list[dict],
                  **kwargs) -> list[float]:
    prompts = []
    for i, info in enumerate(extra_infos):
        if not isinstance(info, dict) or not isinstance(info.get("prompt"), str):
            raise ValueError(f"extra_infos[{i}]: needs the response's prompt as extra_info['prompt']")
        prompts.append(info["prompt"])
    # In requests the server takes (its --max-batch, 256 by default): a verl batch is often larger.
    chunk = int(os.environ.get("RMENS_REWARD_CHUNK", "256"))
    rewards: list[float] = []
    for start in range(0, len(prompts), chunk):
        rewards += _ask(prompts[start:start + chunk], list(solution_strs[start:start + chunk]))
    return rewards


def _ask(prompts: list[str], responses: list[str]) -> list[float]:
    url = os.environ.get("RMENS_REWARD_URL", "http://127.0.0.1:5100").rstrip("/") + "/score"
    headers = {"Content-Type": "application/json"}
    if os.environ.get("RMENS_REWARD_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['RMENS_REWARD_TOKEN']}"
    body = json.dumps({"prompts": prompts, "responses": responses}).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=600) as response:
        return json.loads(response.read())["rewards"]
