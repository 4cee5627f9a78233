"""Quiet logs for the stages: the user sees progress bars and the pipeline's own messages;
everything else (Ray's controller and core-worker lines, MLflow's and open_clip's warnings
and INFO lines, Python warnings) goes to a kept log file, ``logs/<stage>.log``
(``IAA_LOG_DIR``). ``IAA_VERBOSE=1`` shows it all on the terminal as well.

How: the process's file descriptor 2 (where C++ code such as Ray's core worker writes, and
what child processes inherit) is pointed at the log file, while ``sys.stderr`` stays on the
terminal for tqdm and our messages. Logging records from the ``pipelines`` / ``stages``
packages (and the stage module, ``__main__``) reach the terminal; the rest only the file
(a failure that matters raises, and its traceback reaches the terminal). Lines that Ray forwards from its workers and actors are filtered the same way
(``quiet_ray_worker_output``): the training loops' progress bars pass, the rest goes to the file.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

OURS = ("pipelines", "stages", "__main__")
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONSOLE_FORMAT = "%(levelname)s %(name)s: %(message)s"
# a tqdm bar as Ray forwards it from a worker: "head:  40%|####      | 12/30 [00:02<00:03, ...]"
_PROGRESS = re.compile(r"\|\s*\d+/\d+\s*\[")


def verbose() -> bool:
    return os.environ.get("IAA_VERBOSE", "").strip().lower() in ("1", "true", "yes", "on")


def log_dir() -> Path:
    return Path(os.environ.get("IAA_LOG_DIR", "logs"))


class _Ours(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] in OURS


def setup_logging(name: str) -> Path:
    """Route this process's logs as described above; returns the log file's path."""
    path = log_dir() / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    logfile = open(path, "w", encoding="utf-8", buffering=1)  # noqa: SIM115 (lives as long as the process)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    to_file = logging.StreamHandler(logfile)
    to_file.setFormatter(logging.Formatter(FILE_FORMAT))
    root.addHandler(to_file)
    logging.captureWarnings(True)
    # MLflow's own handler would bypass ours: let its records propagate to the root instead
    os.environ["MLFLOW_CONFIGURE_LOGGING"] = "false"
    if verbose():
        console = sys.stderr
    else:
        sys.stderr.flush()
        console = os.fdopen(os.dup(2), "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8")
        os.dup2(logfile.fileno(), 2)
        sys.stderr = console
    to_console = logging.StreamHandler(console)
    to_console.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    if not verbose():
        to_console.addFilter(_Ours())
    root.addHandler(to_console)
    _quiet_imported()
    return path


def _quiet_imported() -> None:
    """Libraries already imported that installed their own stderr handlers (MLflow, Ray, ...,
    e.g. imported by the stage module before ``main`` ran): send their records through ours."""
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.handlers and name.split(".")[0] not in OURS:
            logger.handlers.clear()
            logger.propagate = True


def quiet_ray_loggers() -> None:
    """Ray's ``ray`` logger writes to stderr itself; make it propagate to the root's handlers.

    So does Ray Data's ``ray.data`` (set up when ``ray.data`` is imported: call this after
    that import too); its DEBUG lines are left out of the stage's log.
    """
    if not logging.getLogger().handlers or verbose():
        return
    from ray._private.log import clear_logger

    clear_logger("ray")
    if "ray.data" in sys.modules:
        clear_logger("ray.data")
        logging.getLogger("ray.data").setLevel(logging.INFO)


def quiet_ray_worker_output() -> None:
    """After ``ray.init``: show the workers' progress bars, send their other lines to the log."""
    if verbose() or not logging.getLogger().handlers:
        return
    import ray._private.worker as ray_worker

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
    to_file = logging.getLogger("ray.worker_output")

    def handle(data: dict) -> None:
        lines = data.get("lines", [])
        shown = [line for line in lines if _PROGRESS.search(line)]
        for line in lines:
            if not _PROGRESS.search(line):
                to_file.info("(%s pid=%s) %s", data.get("actor_name") or data.get("task_name") or "", data.get("pid"), line)
        if shown:
            ray_worker.print_to_stdstream({**data, "lines": shown}, ignore_prefix=ignore_prefix)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", handle)
