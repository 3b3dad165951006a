"""Errors the command line reports in one line rather than as a fault (rmens.cli's USER_ERRORS), kept in a module
that imports nothing so that the command line can name them before loading anything heavy."""


class EngineError(RuntimeError):
    """A generation engine in another environment (rmens.vllm_engine) failed to start or to answer; the message
    names the model, the engine's log file and the log's first exception."""


class ShardedStepError(RuntimeError):
    """A sharded training step whose ranks failed (rmens.training.launcher); the message names the rank, its
    error and the job file."""
