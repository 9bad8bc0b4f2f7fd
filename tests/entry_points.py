"""Run a repository entry point (``train.py``, ``anonymize.py``, ...) in its own process, as a user does, without
paying the heavy imports on every run.

A user's run is a fresh interpreter: ``python train.py ...``. Most of its start-up is importing torch, lightning,
diffusers and the package (about five CPU-seconds), the same modules on every run; the suite starts entry points
dozens of times. Here a fork server imports those modules once per test process, and every run is a fork of it: a
new process with its own exit status, standard streams, working directory, Hydra state, loggers and global random
state, running the script as ``__main__`` from its file, exactly as ``python script.py`` does once imports are done.

What a fork cannot reproduce, and where a run therefore starts a fresh interpreter instead:

- another value of a variable that the preloaded modules read at import (``HF_HUB_OFFLINE``, ``HF_HOME``,
  thread counts): the run would see the server's value;
- anything about importing itself (which modules an entry point imports, what happens without an optional
  package): those tests start interpreters of their own.

And one thing every run shares: the server's string-hash seed, so sets of strings iterate in the same order in every
run, where fresh interpreters differ; a comparison of two runs cannot catch an output that depends on set order.

This module is imported in the server and in each run, so it imports nothing that has side effects.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# What every entry point imports before its own work: the fork server imports these once. Modules that only some
# entry points need (insightface, open_clip, ...) are imported by the run itself, as in a fresh interpreter.
PRELOADED = (
    "torch",
    "lightning",
    "diffusers",
    "transformers",
    "torchmetrics",
    "hydra",
    "camouflage_train.cli",
    "camouflage_train.training",
    "camouflage_train.evaluation",
    "camouflage_train.anonymization",
    "camouflage_train.export",
    "camouflage_train.annotation.run",
    "tests.entry_points",
)
# Variables the preloaded modules read while importing (the hub's offline mode and folders, thread counts, ...): a
# run whose values differ from the server's starts a fresh interpreter. Others (set later by tests or by imports,
# such as Lightning's seed) reach the run through its environment, as they reach a subprocess.
_READ_AT_IMPORT = (
    "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DIFFUSERS_", "TORCH", "PYTORCH_", "OMP_", "MKL_", "CUDA", "HOME", "XDG_",
    "PYTHON",
)  # fmt: skip
_server: tuple[multiprocessing.context.BaseContext, dict[str, str]] | None = None


def _comparable(environment: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in environment.items() if key.startswith(_READ_AT_IMPORT)}


def _fork_server() -> tuple[multiprocessing.context.BaseContext, dict[str, str]]:
    """The fork server's context and the environment it imported under (started on first use)."""
    global _server
    if _server is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(list(PRELOADED))
        _server = (context, dict(os.environ))
    return _server


def _run_as_main(script: str, arguments: list[str], cwd: str, environment: dict[str, str], out: str, err: str):
    """In the forked process: the standard streams into files, then the script (or ``-m module``) as
    ``__main__``."""
    sys.stdout.flush()
    sys.stderr.flush()
    for descriptor, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, descriptor)
        os.close(handle)
    os.environ.clear()
    os.environ.update(environment)
    os.chdir(cwd)
    module = script.removeprefix("-m ") if script.startswith("-m ") else None
    sys.argv = [script, *arguments]
    # sys.path[0] as ``python script`` (the script's folder) and ``python -m module`` (the working folder) set it
    sys.path.insert(0, os.getcwd() if module else os.path.dirname(os.path.abspath(script)))
    # A fresh interpreter's global random state: numpy's would otherwise be the server's in every run (Python's own
    # `random` is reseeded at fork; torch's global generator is seeded by what the run does, as in an interpreter).
    import numpy

    numpy.random.seed(int.from_bytes(os.urandom(4), "little"))
    try:
        if module:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(script, run_name="__main__")
    finally:
        # A forked process ends with os._exit: do what an interpreter does at exit, in its order: threading's own
        # exit handlers (which stop executor workers) and the wait for threads that are not daemons, then the exit
        # handlers (loggers' final flush, wandb's finish, temporary folders).
        threading._shutdown()
        atexit._run_exitfuncs()


class EntryPointRun:
    """An entry point started in its own process (forked from the server, or a fresh interpreter when the
    environment differs from the server's): :meth:`result` waits for it, :meth:`kill` ends it at once with SIGKILL,
    as a scheduler or the out-of-memory killer would.

    Args:
        script: the script's path, or ``"-m package.module"``.
        arguments: its command-line arguments.
        cwd: the working folder.
        env: the environment (``None``: this process's).
    """

    def __init__(self, script: Path | str, arguments: list[str], cwd: Path, env: dict[str, str] | None) -> None:
        self.command = [sys.executable, *str(script).split(" ", 1), *arguments]
        environment = dict(os.environ if env is None else env)
        self._folder = tempfile.TemporaryDirectory(prefix="entry-point-")
        self._out, self._err = (os.path.join(self._folder.name, name) for name in ("stdout", "stderr"))
        context, imported_under = _fork_server()
        self._popen: subprocess.Popen | None = None
        self._process = None
        if _comparable(environment) != _comparable(imported_under):
            with open(self._out, "w") as out, open(self._err, "w") as err:
                self._popen = subprocess.Popen(
                    self.command, stdout=out, stderr=err, cwd=cwd, env=environment, text=True
                )
        else:
            self._process = context.Process(
                target=_run_as_main, args=(str(script), list(arguments), str(cwd), environment, self._out, self._err)
            )
            self._process.start()

    def running(self) -> bool:
        """Whether the run has not ended yet."""
        return self._popen.poll() is None if self._popen is not None else self._process.is_alive()

    def kill(self) -> None:
        """End the run at once (SIGKILL); its children, if any, are not signalled."""
        if self._popen is not None:
            self._popen.kill()
        else:
            self._process.kill()

    def result(self, timeout: float) -> subprocess.CompletedProcess:
        """Wait for the run, as :func:`subprocess.run` with ``capture_output=True, text=True`` returns it.

        Args:
            timeout: seconds before the run is killed.

        Raises:
            subprocess.TimeoutExpired: the run took longer than ``timeout`` seconds (it is killed).
        """
        try:
            if self._popen is not None:
                try:
                    self._popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._popen.kill()
                    self._popen.wait()
                    raise
                code = self._popen.returncode
            else:
                self._process.join(timeout)
                if self._process.is_alive():
                    self._process.kill()
                    self._process.join()
                    raise subprocess.TimeoutExpired(self.command, timeout)
                code = self._process.exitcode
            stdout, stderr = (
                Path(path).read_text(encoding="utf-8", errors="replace") for path in (self._out, self._err)
            )
        finally:
            self._folder.cleanup()
        return subprocess.CompletedProcess(self.command, code, stdout, stderr)


def run_entry_point(
    script: Path | str, arguments: list[str], cwd: Path, env: dict[str, str] | None, timeout: float
) -> subprocess.CompletedProcess:
    """``python script arguments`` in ``cwd`` with ``env`` (default: this process's), as
    :func:`subprocess.run` with ``capture_output=True, text=True`` returns it.

    Args:
        script: the script's path, or ``"-m package.module"``.
        arguments: its command-line arguments.
        cwd: the working folder.
        env: the environment (``None``: this process's).
        timeout: seconds before the run is killed.

    Raises:
        subprocess.TimeoutExpired: the run took longer than ``timeout`` seconds (it is killed).
    """
    return EntryPointRun(script, arguments, cwd, env).result(timeout)
