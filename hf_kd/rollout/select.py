"""Which rollout backend a run generates with, decided once from its config: transformers' ``generate`` (default) or
a vLLM server (``use_vllm``), found at ``vllm_server_url`` or started here from the student; and the callback that
keeps the server's weights equal to the student's."""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list
from transformers import TrainerCallback

from ..vllm_server import VLLMServer
from .backend import RolloutBackend, TransformersBackend
from .vllm_backend import VLLMServerBackend
from .weight_sync import EXTENSION, WeightSync, merged_state_dict

EXTENSION_FILE = Path(__file__).with_name("vllm_sync_extension.py")


def vllm_imports() -> bool:
    """Whether vLLM is importable in this process (colocate mode needs it)."""
    return importlib.util.find_spec("vllm") is not None


def extension_path(parent: Path) -> str:
    """A folder under ``parent`` holding only the worker extension module, for a server's PYTHONPATH (the vLLM
    environment must not import hf_kd, whose transformers it may not have)."""
    folder = parent / "vllm_extension"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(EXTENSION_FILE, folder / EXTENSION_FILE.name)
    return str(folder)


def student_backend(args: Any, model: Any, tokenizer: Any, accelerator: Any) -> RolloutBackend:
    """The backend the student's rollouts use (not yet synced: ``WeightSyncCallback`` pushes the weights when
    training begins). Under several processes they all generate through one server: the main process alone starts
    it (and stops it) and pushes the weights, as TRL's server mode does."""
    if not args.use_vllm:
        return TransformersBackend()
    if args.vllm_mode == "colocate":
        raise ValueError(
            "vllm_mode='colocate' runs the vLLM engine inside the training process, "
            + (
                "which hf_kd does not do yet: "
                if vllm_imports()
                else "but vLLM does not import here (on CPU its build pins an older transformers than hf_kd's, so "
                "it lives in its own environment): "
            )
            + "use vllm_mode='server' (with vllm_python='.venv-vllm/bin/python' hf_kd starts the server itself)."
        )
    sync = WeightSync(args.vllm_sync_dir) if accelerator.is_main_process else None
    if args.vllm_server_url is not None:
        return VLLMServerBackend(args.vllm_server_url, timeout=args.vllm_server_timeout, syncer=sync)
    if int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)) < accelerator.num_processes:
        raise ValueError(
            "use_vllm=True without vllm_server_url starts the rollout server on 127.0.0.1 of the main process's "
            "machine, which the processes on the other machines cannot reach: start a server they all reach and set "
            "vllm_server_url to it (and vllm_sync_dir to a folder it can read)."
        )
    server, failure = None, None
    if accelerator.is_main_process:
        try:
            server = start_student_server(args, model, tokenizer, sync.folder)
        except Exception as error:  # raised below, after the other processes learn there is no server
            failure = error
    [url] = broadcast_object_list([server.url if server else None])
    if failure is not None:
        raise failure
    if url is None:
        raise RuntimeError("The main process could not start the vLLM rollout server: its error says why.")
    backend = VLLMServerBackend(url, timeout=args.vllm_server_timeout, syncer=sync, server=server)
    atexit.register(backend.close)  # the owner's server stops with the process at the latest
    return backend


def start_student_server(args: Any, model: Any, tokenizer: Any, folder: Path) -> VLLMServer:
    """A vLLM server on 127.0.0.1 serving the student as written to ``folder``, with the weight-sync extension."""
    python = args.vllm_python or (sys.executable if vllm_imports() else None)
    if python is None:
        raise ValueError(
            "use_vllm=True starts a vLLM server for the rollouts, but vLLM does not import in this environment: set "
            "vllm_python to the Python of the one it is installed in (bash scripts/setup_vllm.sh makes "
            ".venv-vllm), or vllm_server_url to a running server."
        )
    with torch.no_grad():
        plain, state = merged_state_dict(model)
        plain.save_pretrained(folder, state_dict=dict(state), safe_serialization=True)
    tokenizer.save_pretrained(folder)
    max_length = (args.max_length or 1024) + args.max_new_tokens
    dtype = str(plain.dtype).removeprefix("torch.")
    server = VLLMServer(
        folder,
        python,
        max_model_len=max_length,
        dtype=dtype,
        startup_timeout=900,
        extra_args=["--worker-extension-cls", EXTENSION],
        env={"VLLM_SERVER_DEV_MODE": "1", "PYTHONPATH": extension_path(folder)},
    )
    return server.start()


def teacher_backend(source: Any, args: Any) -> RolloutBackend | None:
    """seq_kd from a served teacher: its server generates (never synced); None for a teacher in this process."""
    client = getattr(source, "client", None)
    if client is None:
        return None
    return VLLMServerBackend(
        client.url, model=client.model, vocab_size=source.vocab_size, timeout=args.vllm_server_timeout
    )


class WeightSyncCallback(TrainerCallback):
    """Pushes the student into the rollout engine when training begins (a resumed run: the checkpoint's weights)
    and every ``vllm_sync_steps`` optimizer steps; the main process pushes, the others wait for it."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def push(self) -> None:
        trainer = self.trainer
        if trainer.accelerator.is_main_process:
            trainer.rollout_backend.sync(trainer.accelerator.unwrap_model(trainer.model))
            seconds = trainer.rollout_backend.syncer.seconds
            trainer._metrics["train"]["vllm/sync_seconds"].append(seconds)
        trainer.accelerator.wait_for_everyone()

    def on_train_begin(self, args, state, control, **kwargs):
        self.push()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.vllm_sync_steps == 0:
            self.push()


__all__ = ["WeightSyncCallback", "extension_path", "student_backend", "teacher_backend", "vllm_imports"]
