"""What every flow does at its entry, whoever starts it: the `rmens` command, or a Prefect worker, which runs
`python -m prefect.engine` and imports flows/*.py by path, so that nothing flows/cli.py sets up applies.

- The same quiet console: libraries' progress bars and INFO chatter off, known-harmless warnings silenced,
  the stage lines on their own handler, and Prefect's INFO lines sent to its UI only.
- Logs in Prefect's UI: Prefect's run loggers keep INFO (its API handler gets them; only the console
  drops them), and the stage lines go there too.
- A bad setting is one `rmens: error:` line: the flow run ends Failed with that message (the flow checks its
  settings first, rmens.preflight) instead of two tracebacks.

Importing this module sets the environment that libraries read once, at their own import (MLflow's log level
and progress bars, Hugging Face's bars, telemetry), so each flow module imports it before anything that
imports MLflow or transformers; flows/cli.py imports it before any flow.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pydantic

from rmens.cli import USER_ERRORS, error_line

# Read at the import of the library that reads it; offline, telemetry would only log failures.
CONSOLE_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # per-file bars when logging or downloading models
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # its INFO lines (table creation, signature checks)
}
for _key, _value in CONSOLE_ENV.items():
    os.environ.setdefault(_key, _value)

PROGRESS = "rmens.progress"  # rmens.steps.runner's stage lines


def show_progress() -> None:
    """The console's stage lines (tasks.runtime.stager logs one as each stage starts and ends), on their own
    handler, so that they show whatever level the root logger has."""
    progress = logging.getLogger(PROGRESS)
    if not any(getattr(handler, "rmens_console", False) for handler in progress.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s  %(message)s", "%H:%M:%S"))
        handler.rmens_console = True
        progress.addHandler(handler)
        progress.setLevel(logging.INFO)
        progress.propagate = False


def quiet_known_warnings() -> None:
    """Known-harmless third-party warnings, silenced by message (the rest still show)."""
    # alpaca_eval imports pkg_resources; setuptools is pinned below 81, where it still exists.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    # MLflow's SQL layer logs each failed statement with a traceback, then raises the same error to the caller,
    # which reports it once (a full disk gave dozens of them).
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


class PrefectInfoToTheUIOnly(logging.Filter):
    """On a console handler: Prefect's INFO lines (a flow or task run began, finished in state Completed)
    stay off the console, and so do its tracebacks and the records of an error that entry_point already
    reported in one line; its API handler, attached to its run loggers, still sends them to the UI first.

    Lowering Prefect's log level instead (PREFECT_LOGGING_LEVEL=WARNING, as the CLI did) drops those records
    before any handler sees them, so a run's Logs tab said "This run didn't generate logs"."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("prefect"):
            return True
        reported = record.exc_info is not None and getattr(record.exc_info[1], "rmens_reported", False)
        if record.levelno < logging.WARNING or reported:
            return False
        # A failed task's traceback, then the flow's: the command ends with the error itself (one line for a
        # user's or the machine's mistake, the traceback for a fault), so the console keeps that one copy.
        record.exc_info = record.exc_text = None
        return True


def quiet_console() -> None:
    """The console as the CLI keeps it, in this process (idempotent). The root logger's handlers are the
    console: the CLI's (logging.basicConfig) or, in a worker's flow-run process, Prefect's own."""
    show_progress()
    quiet_known_warnings()
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, PrefectInfoToTheUIOnly) for f in handler.filters):
            handler.addFilter(PrefectInfoToTheUIOnly())


quiet_console()  # a worker's flow-run process has set up Prefect's logging before it imports a flow


@contextlib.contextmanager
def progress_to_the_ui() -> Iterator[None]:
    """The stage lines also in the flow run's Logs tab, while the flow runs (Prefect's API handler, as its
    PREFECT_LOGGING_EXTRA_LOGGERS setting would attach it, but only for the run: outside one it would warn)."""
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger(PROGRESS)
    if any(isinstance(handler, APILogHandler) for handler in logger.handlers):
        yield
        return
    handler = APILogHandler()
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


F = TypeVar("F", bound=Callable[..., Any])


def entry_point(fn: F) -> F:
    """Below `@flow(..., validate_parameters=False)`: the quiet console and the stage lines in the UI for the
    run; the parameters validated by pydantic against the flow's signature; and a user's mistake (a bad
    setting, a missing data folder: rmens.cli.USER_ERRORS) as one `rmens: error:` line in the run's log and a
    Failed run with that message.

    Prefect's own parameter validation reports a bad setting in three ERROR records and a traceback, before
    any flow code runs; pydantic's error here becomes the same one line as in the CLI. The exception is the
    Failed state's data, so that calling the flow in-process (the CLI) raises it as before; a worker's engine
    then logs it again with a traceback, which the console filter leaves to the UI (it is marked reported)."""
    # Annotations resolved in the flow module's own namespace (`from __future__ import annotations` makes them
    # strings), and a pydantic model of the parameters, named after the flow for its error line.
    signature = inspect.signature(fn, eval_str=True)
    parameters = pydantic.create_model(fn.__name__, __config__=pydantic.ConfigDict(extra="forbid"), **{
        name: (Any if p.annotation is p.empty else p.annotation, ... if p.default is p.empty else p.default)
        for name, p in signature.parameters.items()})

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        from prefect import get_run_logger
        from prefect.states import Failed

        from tasks.runtime.stager import clear_stop_flags

        clear_stop_flags()  # a stop swallowed during an earlier flow in this process is not this one's
        quiet_console()
        with progress_to_the_ui():
            try:
                # By name (Prefect passes them by position), so that an error names `config.data.source`.
                values = parameters.model_validate(signature.bind(*args, **kwargs).arguments)
                return fn(**{name: getattr(values, name) for name in signature.parameters})
            except USER_ERRORS as err:
                line = f"rmens: error: {error_line(err)}"
                get_run_logger().error(line)  # Prefect logs the Failed state at INFO: not on the console
                err.rmens_reported = True
                return Failed(message=line, data=err)

    # Prefect builds the deployment's parameter schema (the UI's form) from the signature, and would resolve
    # string annotations in this module, where the flow's config classes are not: give it the resolved ones.
    run.__signature__ = signature
    return run  # type: ignore[return-value]
