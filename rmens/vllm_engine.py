"""Sampling through a vLLM engine that runs in its own Python environment (generation.backend "vllm").

vLLM pins torch and transformers releases that rmens' environment cannot share, so the engine runs as a
subprocess of another interpreter (rmens/workers/vllm_worker.py, which imports no rmens) and rmens never
imports vllm. rmens keeps what decides a sample's meaning on its side: it renders the chat template and
tokenizes with the policy's own tokenizer, names the stop tokens, draws one seed per response from
rmens.seeding (so a re-run, or another chunking, draws the same samples) and decodes the tokens it gets back.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from rmens.data.encoding import Prompt
from rmens.errors import EngineError
from rmens.generation import Samples, encode_prompts, eos_ids_of_model, samples_from_tokens
from rmens.generation_config import VLLM_WORKER, GenerationConfig, VllmConfig
from rmens.models.backbone import model_context, resolve_model
from rmens.seeding import Stream, seed_for

log = logging.getLogger(__name__)


class VllmEngine:
    """One engine serving one model for the life of a `with` block."""

    def __init__(self, model: str, cfg: VllmConfig):
        self.cfg = cfg
        self.model_dir = resolve_model(model)
        python = Path(cfg.interpreter()).expanduser()
        if not python.is_file():
            raise FileNotFoundError(f"generation.vllm.python: {python} is not a file (the vLLM environment's "
                                    "interpreter, e.g. .venv-vllm/bin/python; make vllm-env builds one)")
        settings = {"model": self.model_dir, "dtype": cfg.dtype, "cpu_memory_gib": cfg.cpu_memory_gib,
                    "gpu_memory_utilization": cfg.gpu_memory_utilization, "max_model_len": cfg.max_model_len,
                    "engine_args": cfg.engine_args}
        descriptor, log_name = tempfile.mkstemp(prefix="rmens-vllm-", suffix=".log")
        self.log_path = Path(log_name)
        # A session of its own: vLLM's engine and worker processes are the worker's children, and stopping the
        # engine must stop them all (they hold the device's memory)
        with os.fdopen(descriptor, "w") as log_file:
            self.process = subprocess.Popen([str(python), str(VLLM_WORKER), json.dumps(settings)],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file,
                                            text=True, bufsize=1, start_new_session=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        log.info("vllm: starting an engine for %s (its log: %s)", self.model_dir, self.log_path)
        try:
            hello = self._receive(timeout=cfg.start_timeout_s, doing="start")
        except BaseException:  # a failed start, or a stop asked while it loads: the engine must not live on
            self.close(wait_s=0)
            raise
        self.version = hello.get("vllm", "unknown")

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)  # the worker closed its stdout: it exited

    def _receive(self, timeout: float | None, doing: str) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:  # in short waits: a worker that died while a child of it keeps the pipe open sends no EOF
            try:
                line = self.lines.get(timeout=1.0)
                break
            except queue.Empty:
                if self.process.poll() is not None:
                    line = None
                    break
                if deadline is not None and time.monotonic() > deadline:
                    self.close(wait_s=0)
                    raise EngineError(self._failure(f"did not {doing} within {timeout:g} s")) from None
        if line is None:  # the worker closed its end: it exited (or is exiting); so must its children
            self.close(wait_s=5)
            raise EngineError(self._failure(f"exited with code {self.process.returncode} during {doing}"))
        reply = json.loads(line)
        if "error" in reply:
            raise EngineError(self._failure(f"could not {doing}: {reply['error']}"))
        return reply

    def _failure(self, what: str) -> str:
        """`what` happened, with the log's first exception line (vLLM's root cause usually comes first, its
        engine-dead summary last) and its last lines."""
        lines = self.log_path.read_text(errors="replace").strip().splitlines() if self.log_path.exists() else []
        cause = [line for line in lines if re.search(r"\w+(Error|Exception): ", line)][:1]
        shown = cause + [line for line in lines[-3:] if line not in cause]
        return f"the vLLM engine for {self.model_dir} {what} (log: {self.log_path})" + \
            "".join(f"\n  {line.strip()}" for line in shown)

    def complete(self, prompt_ids: list[list[int]], seeds: list[int], cfg: GenerationConfig,
                 stop: list[int]) -> list[dict]:
        """One request: a completion (token_ids, finish_reason, stop_reason) per prompt."""
        request = {"prompt_token_ids": prompt_ids, "seeds": seeds, "temperature": cfg.temperature, "top_p": cfg.top_p,
                   "greedy": not cfg.do_sample, "max_tokens": cfg.max_new_tokens, "stop_token_ids": stop}
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            self.close(wait_s=0)
            raise EngineError(self._failure(f"exited with code {self.process.returncode}")) from None
        outputs = self._receive(timeout=None, doing="generate")["outputs"]
        if len(outputs) != len(prompt_ids):
            raise EngineError(self._failure(f"answered {len(outputs)} completions for {len(prompt_ids)} prompts"))
        return outputs

    def generate(self, tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt], cfg: GenerationConfig, *,
                 stream: Stream = Stream.SAMPLE, indices: tuple[int, ...] = (), progress: bool = False) -> Samples:
        """rmens.generation.generate's contract: one response per prompt; response i draws from the seed of
        (cfg.seed, stream, *indices, i)."""
        context = min(model_context(self.model_dir), self.cfg.max_model_len or float("inf"))
        prompt_ids = encode_prompts(tokenizer, prompts, cfg.max_new_tokens, int(context))
        stop = eos_ids_of_model(self.model_dir, tokenizer)
        seeds = [seed_for(cfg.seed, stream, *indices, i) for i in range(len(prompts))]
        tokens: list[list[int]] = []
        for start in tqdm(range(0, len(prompts), self.cfg.chunk), desc="generate (vllm)", disable=not progress):
            end = start + self.cfg.chunk
            for output in self.complete(prompt_ids[start:end], seeds[start:end], cfg, stop):
                ids = list(output["token_ids"])
                # vLLM may leave the stop token out of token_ids; rmens' samples end with it when one stopped them
                if output["finish_reason"] == "stop" and (not ids or ids[-1] not in stop):
                    ids.append(output["stop_reason"] if output["stop_reason"] in stop else stop[0])
                tokens.append(ids)
        return samples_from_tokens(tokenizer, list(prompts), prompt_ids, tokens, stop)

    def close(self, wait_s: float = 60) -> None:
        """End the engine: its stdin closes, so the worker finishes and exits; one that has not within `wait_s`
        seconds (a hung one, or one stopped at once) is terminated, then killed, with every process it started."""
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                pass
        for signum in (signal.SIGTERM, signal.SIGKILL):  # the session it leads: vLLM's engine processes too
            if not self._signal_group(signum, grace_s=10):
                break
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.warning("vllm: the engine's worker %d did not exit", self.process.pid)

    def _signal_group(self, signum: int, grace_s: float) -> bool:
        """Send `signum` to the engine's process group and wait until it is empty; False when it is (or was)."""
        try:
            os.killpg(self.process.pid, signum)
        except (ProcessLookupError, PermissionError):
            return False
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            self.process.poll()  # reap the leader, so that an exited group reads as gone
            try:
                os.killpg(self.process.pid, 0)
            except (ProcessLookupError, PermissionError):
                return False
            time.sleep(0.1)
        return True

    def __enter__(self) -> VllmEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        if exc[0] is None:
            self.log_path.unlink(missing_ok=True)  # kept after a failure: its path is in the error
