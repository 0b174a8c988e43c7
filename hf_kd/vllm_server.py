"""Start vLLM's OpenAI-compatible server on 127.0.0.1 for a served teacher, and stop it by its pid.

vLLM lives in its own virtualenv (``scripts/setup_vllm.sh`` makes ``.venv-vllm``: its CPU build pins an older
transformers than hf_kd's), so the server runs as a subprocess of that environment's Python. The flags and
environment are the ones that work on vLLM's CPU build (see docs/served_teacher.md); on a GPU build the CPU
variables are ignored. The server and its engine processes share one process group, stopped with SIGTERM and,
after ``stop_timeout`` seconds, SIGKILL; ``parent_watch.py`` leads that group and stops it if the process that
started the server dies without stopping it (SIGKILL, an out-of-memory kill).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

HOST = "127.0.0.1"
PARENT_WATCH = Path(__file__).with_name("parent_watch.py")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def cpu_list() -> str:
    """The CPUs this process may run on, as vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` reads them ("0,1,2")."""
    return ",".join(str(cpu) for cpu in sorted(os.sched_getaffinity(0)))


class VLLMServer:
    """A vLLM server for ``model`` (a plain HF folder or served name) on 127.0.0.1; a context manager.

    ``python`` is the interpreter of the environment where vLLM is installed (e.g. ``.venv-vllm/bin/python``).
    ``max_logprobs`` bounds the ``top_k`` clients may ask for; ``max_model_len`` the tokens per sequence.
    ``dtype="float32"`` makes the served log-probabilities match transformers' fp32 ones. ``kv_cache_gib`` is the
    CPU KV cache (without it vLLM's CPU build asks for most of the memory); ``cpus`` the CPUs its threads bind to
    (default: all this process may use, none reserved). Start-up waits for ``/health`` up to ``startup_timeout``
    seconds. The server's output goes to ``log_path`` (default: a temporary file, removed after a clean stop).
    ``extra_args`` are more server flags, ``env`` more environment variables (e.g. a rollout server's weight sync).
    """

    def __init__(
        self,
        model: str | os.PathLike,
        python: str | os.PathLike,
        *,
        port: int | None = None,
        max_logprobs: int = 64,
        max_model_len: int = 1024,
        dtype: str = "float32",
        kv_cache_gib: int = 1,
        cpus: str | None = None,
        startup_timeout: float = 300.0,
        stop_timeout: float = 30.0,
        log_path: str | os.PathLike | None = None,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ):
        if not Path(python).is_file():
            raise FileNotFoundError(
                f"No Python at {python}: install vLLM in its own virtualenv first (bash scripts/setup_vllm.sh)."
            )
        self.model, self.python = str(model), str(python)
        self.port = port or free_port()
        self.startup_timeout, self.stop_timeout = startup_timeout, stop_timeout
        self.args = [
            *("--model", self.model, "--host", HOST, "--port", str(self.port), "--dtype", dtype),
            *("--max-logprobs", str(max_logprobs), "--max-model-len", str(max_model_len), "--enforce-eager"),
            # Whole prefills only: on the CPU build a seeded request whose prefill is split over two steps kills the
            # engine ("CPU Generator does not use offset"), as rollouts of 32 prompts did.
            "--no-enable-chunked-prefill",
            *extra_args,
        ]
        self.env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
            "VLLM_CPU_OMP_THREADS_BIND": cpus or cpu_list(),
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            **(env or {}),
        }
        self._own_log = log_path is None
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="vllm-server-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The OpenAI-compatible base URL, as ``ServedTeacher`` takes it."""
        return f"http://{HOST}:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def log_tail(self, lines: int = 30) -> str:
        """The last lines the server printed (for error messages)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> VLLMServer:
        """Launch the server in its own process group and wait until ``/health`` answers 200."""
        if self.process is not None:
            raise RuntimeError(f"The vLLM server for {self.model} is already started (pid {self.pid}).")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    *(self.python, str(PARENT_WATCH), str(os.getpid())),
                    *(self.python, "-m", "vllm.entrypoints.openai.api_server", *self.args),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,  # its own process group: stop() reaches the engine processes too
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._fail(f"exited with code {self.process.returncode} while starting")
            if self.healthy():
                return self
            time.sleep(1.0)
        self._fail(
            f"did not answer {self.url} within {self.startup_timeout:.0f} s (raise startup_timeout when loaded)"
        )

    def _fail(self, what: str) -> None:
        """Stop the server and raise an error with its last lines."""
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"The vLLM server for {self.model} {what}. Its last lines:\n{tail}")

    def healthy(self) -> bool:
        """Whether ``GET /health`` answers 200 now."""
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.port}/health", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``stop_timeout`` s; safe to call twice.

        vLLM sometimes aborts while shutting down (after its work is done): the exit code is not judged.
        """
        if self.process is None:
            return
        process, self.process = self.process, None
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=self.stop_timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # engine processes that outlived the server
        except ProcessLookupError:
            pass
        process.wait()
        if self._own_log:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
