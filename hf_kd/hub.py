"""Hub uploads of distilled students, on top of ``transformers.Trainer.push_to_hub``.

``DistillationHubMixin`` goes before the Trainer in a trainer's bases. It writes the model card (hf_kd.model_card)
on every save and pushes the student (full weights or LoRA adapter) through Trainer's own ``push_to_hub``, or a
merged copy of a LoRA student. A push uploads an allow-list of the output folder (``UPLOAD_PATTERNS``: the student,
tokenizer, card, curves and results), never whatever else a user keeps there. The trainable distillation helpers
(``MODULES_FILE``) stay local unless ``include_helpers=True`` uploads them under ``distillation_modules/``. The Hub
token is never written to disk: ``training_args.bin`` is saved from a copy of the arguments without it.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from huggingface_hub import CommitOperationAdd
from transformers import trainer as trainer_module
from transformers.utils import logging

from .model_card import CARD_NAME, card_data_from_trainer, is_peft_model, write_model_card

logger = logging.get_logger(__name__)

MODULES_FILE = "_hf_kd_modules.safetensors"
"""The trainable distillation helpers (DSKD projectors, the DAC-KL sub-network), saved beside the student."""
TEACHERS_FILE = "_hf_kd_teachers.json"
"""Several teachers: each teacher's name and origin and the routing column, saved beside the student."""
HELPER_PATTERN = "_hf_kd_modules*"
"""Helper files in an output or checkpoint folder (``MODULES_FILE`` and any sibling a subclass saves)."""
HELPER_SUBFOLDER = "distillation_modules"
MERGED_SUBFOLDER = "_merged"
"""Where a merged copy of a LoRA student is saved inside ``output_dir`` (skipped by Trainer's ``"_*"`` pattern)."""
MERGED_MARKER = ".hf_kd_merged"
"""Marks a folder ``save_merged_model`` wrote: only such a folder (or an empty one) is replaced by the next merge."""
UPLOAD_PATTERNS = (
    # the student: full weights (one file, or shards and their index) or a LoRA adapter, and its configs
    *("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json"),
    *("pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json"),
    *("adapter_model.safetensors", "adapter_model.bin", "adapter_config.json", "config.json"),
    "generation_config.json",
    *("configuration_*.py", "modeling_*.py", "tokenization_*.py"),  # a remote-code student's own code
    # the tokenizer
    *("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model"),
    *("vocab.json", "vocab.txt", "merges.txt", "spiece.model", "chat_template.jinja", "chat_template.json"),
    "additional_chat_templates/*",
    # the model card, training curves and results
    *("README.md", "training_curves.png", "trainer_state.json", "runs/*"),
    *("all_results.json", "train_results.json", "eval_results.json", "demo_results.json", "demo_results.md"),
)
"""What a push uploads of the output folder (``upload_folder`` allow patterns), with the card's figures
(``trainer.card_figures``). Helper files go up only on request (``include_helpers``); anything else stays local."""
TOKEN_FIELDS = ("hub_token",)
"""Training-argument fields that hold a secret (transformers 5 has no other; ``push_to_hub_token`` was removed).
A ``"token"`` key of a dict-valued field (``model_init_kwargs``: ``from_pretrained``'s token) is one too."""
CARD_OPTIONS = ("dataset_name", "tags", "license", "language", "finetuned_from", "helpers_included")

HELPERS_README = """# Distillation modules

Trainable modules that hf_kd trained next to the student (DSKD projectors, the DAC-KL clipping sub-network).
They are not needed for inference: load the student from the repository root. They let a distillation run resume
with its helpers intact.

Files: {files}

```python
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file  # use torch.load(path, weights_only=True) for .pt files

state_dict = load_file(hf_hub_download("{repo_id}", "{subfolder}/{first}"))
# modules.load_state_dict(state_dict), where `modules` are built by the same hf_kd recipe
```
"""

_T = TypeVar("_T")


class HubPushError(RuntimeError):
    """A Hub call of ``push_to_hub`` failed; the local output is untouched."""


def helper_files(folder: str | Path) -> list[tuple[Path, str]]:
    """(file, name in the repo's ``distillation_modules/``) of every helper file in ``folder`` (``HELPER_PATTERN``);
    the name drops the leading underscore that keeps the file out of Trainer's uploads."""
    root = Path(folder)
    entries = sorted(root.iterdir()) if root.is_dir() else []
    return [(entry, entry.name.lstrip("_")) for entry in entries if fnmatch.fnmatch(entry.name, HELPER_PATTERN)]


class _NarrowedUploads:
    """The Hub API, with Trainer's ``upload_folder`` calls narrowed: an upload of ``output_dir`` takes ``allow`` as its
    allow patterns, every upload skips ``ignore`` too, and ``token`` is used where the call names none."""

    def __init__(self, api: Any, output_dir: Path, allow: list[str], ignore: list[str], token: str | None):
        self._api, self._output_dir, self._allow, self._ignore, self._token = api, output_dir, allow, ignore, token

    def __getattr__(self, name: str) -> Any:
        return getattr(self._api, name)

    def upload_folder(
        self, *, folder_path: str | Path, ignore_patterns: list[str] | str | None = None, **kwargs: Any
    ) -> Any:
        ignore = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])
        if Path(folder_path).resolve() == self._output_dir.resolve():
            kwargs["allow_patterns"] = self._allow
        if kwargs.get("token") is None:
            kwargs["token"] = self._token
        return self._api.upload_folder(folder_path=folder_path, ignore_patterns=ignore + self._ignore, **kwargs)


@contextlib.contextmanager
def _narrowed_uploads(
    output_dir: Path, allow: list[str], ignore: Sequence[str] = (), token: str | None = None
) -> Iterator[None]:
    """Within the block, Trainer's Hub calls (``transformers.trainer.hf_api``) go through ``_NarrowedUploads``.
    Only the scheduling of the uploads happens inside: their arguments are bound when they are called."""
    original = trainer_module.hf_api
    trainer_module.hf_api = lambda: _NarrowedUploads(original(), output_dir, allow, list(ignore), token)
    try:
        yield
    finally:
        trainer_module.hf_api = original


def _check_replaceable(target: Path, default: Path) -> None:
    """Refuse a merge target that exists and is not an empty folder or a merged copy hf_kd wrote."""
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise FileExistsError(f"save_merged_model cannot write to {target}: it exists and is not a folder.")
    if (target / MERGED_MARKER).is_file() or not any(target.iterdir()):
        return
    raise FileExistsError(
        f"save_merged_model will not write to {target}: the folder holds files and is not a merged copy that "
        f"hf_kd wrote (it has no {MERGED_MARKER}), and replacing it would delete them. Pass a new or empty folder "
        f"(the default is {default}), or move this one away first."
    )


def _replace_folder(partial: Path, target: Path) -> None:
    """Rename ``partial`` onto ``target``; an existing ``target`` (checked by ``_check_replaceable``) is moved aside
    first and deleted only once the new folder is in place."""
    if not target.exists():
        partial.rename(target)
        return
    previous = target.with_name(f"_{target.name}.previous-{os.getpid()}")
    shutil.rmtree(previous, ignore_errors=True)
    target.rename(previous)
    partial.rename(target)
    shutil.rmtree(previous)


class DistillationHubMixin:
    """Model card on every save and Hub pushes (full model, LoRA adapter or merged copy) for a Trainer subclass.

    Use as ``class DistillationTrainer(DistillationHubMixin, GKDTrainer)``. Set ``push_helpers = True`` on the
    trainer to include the helper files in the checkpoint pushes of ``hub_strategy`` ``checkpoint`` and
    ``all_checkpoints`` (Trainer uploads those folders whole); by default every push leaves them out. Pushes of
    ``output_dir`` upload ``upload_patterns`` only (``UPLOAD_PATTERNS``; extend it to upload more).
    """

    push_helpers: bool = False
    upload_patterns: tuple[str, ...] = UPLOAD_PATTERNS

    def model_card_data(self, model_name: str | None = None, **options: Any) -> Any:
        """The card's contents for this trainer (see ``hf_kd.model_card.card_data_from_trainer``)."""
        return card_data_from_trainer(self, model_name, **options)

    def _card_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Check the card keyword arguments; ``dataset`` (Trainer's name) is read as ``dataset_name``."""
        options = dict(options)
        dataset = options.pop("dataset", None)
        if options.get("dataset_name") is None and dataset is not None:
            options["dataset_name"] = dataset
        unknown = sorted(set(options) - set(CARD_OPTIONS))
        if unknown:
            raise TypeError(
                f"Unsupported model card arguments {unknown}; supported: {list(CARD_OPTIONS)} and 'dataset'."
            )
        return options

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | list[str] | None = None,
        tags: str | list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write the distillation model card to ``args.output_dir/README.md`` (main process only).

        Extra keyword arguments: ``license``, ``language``, ``finetuned_from``, ``helpers_included`` and ``dataset``
        (read as ``dataset_name``).
        """
        if not self.is_world_process_zero():
            return
        options = self._card_options({"dataset_name": dataset_name, "tags": tags, **kwargs})
        write_model_card(self.args.output_dir, self.model_card_data(model_name, **options))

    def _upload_allow_list(self) -> list[str]:
        """``upload_patterns`` and the card's figures (``card_figures``, files beside the card)."""
        return [*self.upload_patterns, *(getattr(self, "card_figures", None) or [])]

    @contextlib.contextmanager
    def _args_without_tokens(self) -> Iterator[None]:
        """Within the block ``self.args`` is a copy with the ``TOKEN_FIELDS`` blanked: Trainer pickles the arguments
        into ``training_args.bin`` (output folder, every checkpoint, checkpoint pushes), which must not hold them."""
        args = self.args
        blanked = {name: None for name in TOKEN_FIELDS if getattr(args, name, None) is not None}
        for name, value in vars(args).items():
            if isinstance(value, dict) and "token" in value:
                blanked[name] = {key: item for key, item in value.items() if key != "token"}
        if not blanked:
            yield
            return
        self.args = copy.copy(args)
        for name, value in blanked.items():
            setattr(self.args, name, value)
        try:
            yield
        finally:
            self.args = args

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Trainer's save, with ``training_args.bin`` written from arguments without the Hub token."""
        with self._args_without_tokens():
            super()._save(output_dir, state_dict)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save as Trainer does, then write the model card next to the weights."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if not (self.args.should_save and self.is_world_process_zero()):
            return
        target = output_dir if output_dir is not None else self.args.output_dir
        try:
            write_model_card(target, self.model_card_data())
        except Exception as err:  # a card must never cost the saved weights
            logger.warning(f"The model card was not written to {target}: {type(err).__name__}: {err}")

    def _refuse_merge(self) -> None:
        student = self.accelerator.unwrap_model(self.model)
        if not is_peft_model(student):
            raise ValueError(
                "merge_adapter=True needs a LoRA (PEFT) student, but this student is a full model: "
                "push it with merge_adapter=False."
            )
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            raise ValueError(
                "merge_adapter=True is not supported when the student is sharded (FSDP/DeepSpeed): push the adapter, "
                "then merge it with AutoPeftModelForCausalLM.from_pretrained(repo).merge_and_unload()."
            )

    def save_merged_model(self, output_dir: str | Path | None = None, **card_kwargs: Any) -> Path:
        """Save the LoRA student merged into its base (a copy: the trained adapter is left as it is), with card.

        The copy is written to a temporary folder beside the target (default ``args.output_dir/_merged``) and
        renamed into place. An existing folder is replaced only when it is empty or a merged copy that hf_kd wrote
        (it holds ``MERGED_MARKER``); any other is refused with an error, and nothing in it is touched.
        """
        self._refuse_merge()
        default = Path(self.args.output_dir) / MERGED_SUBFOLDER
        target = Path(output_dir) if output_dir is not None else default
        _check_replaceable(target, default)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"_{target.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)  # left by a merge of this name that was killed
        try:
            merged = copy.deepcopy(self.accelerator.unwrap_model(self.model)).merge_and_unload()
            merged.save_pretrained(partial)
            if getattr(self, "processing_class", None) is not None:
                self.processing_class.save_pretrained(partial)
            del merged
            write_model_card(partial, self.model_card_data(merged=True, **card_kwargs))
            (partial / MERGED_MARKER).write_text(
                "Written by hf_kd's save_merged_model: the next merge into this folder replaces it whole.\n"
            )
            _replace_folder(partial, target)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return target

    def _hub_call(self, what: str, folder: str | Path, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except Exception as err:
            repo = self.hub_model_id or self.args.hub_model_id
            message = (
                f"Could not {what} on the Hugging Face Hub (repo '{repo}'): {type(err).__name__}: {err}. "
                f"Nothing was deleted: the saved student and its model card are still in '{folder}'. "
                "Check the network, the token (`hf auth login` or `hub_token`) and your write access to the repo, "
                f"then retry with `trainer.push_to_hub()` or `hf upload {repo} {folder}`."
            )
            logger.error(message)
            raise HubPushError(message) from err

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        merge_adapter: bool = False,
        include_helpers: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Upload the student with its card to ``args.hub_model_id``, through ``Trainer.push_to_hub``.

        A LoRA student is pushed as its adapter, or merged into its base with ``merge_adapter=True`` (a merged copy
        is saved to ``output_dir/_merged`` and uploaded in place of ``output_dir``). Distillation helpers stay
        local unless ``include_helpers=True``, which uploads them under ``distillation_modules/`` in a second
        commit. A failed Hub call raises ``HubPushError`` naming the step and how to retry, and leaves every local
        file in place; with ``blocking=False`` the model upload runs in the background and its errors surface from
        the returned future.
        """
        private = kwargs.pop("private", None)
        token = token if token is not None else self.args.hub_token
        if merge_adapter:
            self._refuse_merge()
        options = self._card_options(kwargs)
        output_dir = Path(self.args.output_dir)
        if self.hub_model_id is None:
            self._hub_call(
                "create the repository", output_dir, lambda: self.init_hf_repo(token=token, private=private)
            )
        options["helpers_included"] = include_helpers and bool(helper_files(output_dir))
        if merge_adapter:
            result = self._push_merged(commit_message, blocking, token, revision, options)
        else:
            push = super().push_to_hub  # saves, writes the card (create_model_card above), uploads output_dir
            with _narrowed_uploads(output_dir, self._upload_allow_list()):
                result = self._hub_call(
                    "upload the model folder",
                    output_dir,
                    lambda: push(commit_message, blocking, token, revision, **options),
                )
        if include_helpers and self.is_world_process_zero():
            self._push_helpers(commit_message, token, revision)
        return result

    def _push_merged(
        self, commit_message: str | None, blocking: bool, token: str | None, revision: str | None, options: dict
    ) -> Any:
        """Save the adapter and its card to ``output_dir``, then upload a merged copy in its place."""
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        model_name = (self.args.hub_model_id or Path(self.args.output_dir).name).split("/")[-1]
        self.create_model_card(model_name=model_name, **options)
        folder = self.save_merged_model(model_name=model_name, **options)
        self._finish_current_push()
        return self._hub_call(
            "upload the model folder",
            folder,
            lambda: trainer_module.hf_api().upload_folder(
                repo_id=self.hub_model_id,
                folder_path=folder,
                allow_patterns=self._upload_allow_list(),
                commit_message=commit_message,
                token=token,
                run_as_future=not blocking,
                revision=revision if revision is not None else self.args.hub_revision,
            ),
        )

    def _push_helpers(self, commit_message: str | None, token: str | None, revision: str | None) -> None:
        """Upload the helper files under ``distillation_modules/`` with a README, in one commit."""
        output_dir = Path(self.args.output_dir)
        files = helper_files(output_dir)
        if not files:
            logger.warning(
                f"include_helpers=True, but {output_dir} has no file matching {HELPER_PATTERN!r}: "
                "no distillation modules were uploaded."
            )
            return
        names = [name for _, name in files]
        readme = HELPERS_README.format(
            files=", ".join(f"`{name}`" for name in names),
            repo_id=self.hub_model_id,
            subfolder=HELPER_SUBFOLDER,
            first=names[0],
        )
        operations = [
            CommitOperationAdd(path_in_repo=f"{HELPER_SUBFOLDER}/{name}", path_or_fileobj=str(path))
            for path, name in files
        ]
        operations.append(
            CommitOperationAdd(path_in_repo=f"{HELPER_SUBFOLDER}/{CARD_NAME}", path_or_fileobj=readme.encode())
        )
        self._hub_call(
            "upload the distillation modules",
            output_dir,
            lambda: trainer_module.hf_api().create_commit(
                repo_id=self.hub_model_id,
                operations=operations,
                commit_message=f"{commit_message or 'Upload'} (distillation modules)",
                token=token,
                revision=revision if revision is not None else self.args.hub_revision,
            ),
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Trainer's checkpoint pushes (``hub_strategy`` other than ``end``): ``output_dir`` through the allow-list,
        the checkpoint folder whole (it is what a resume needs) but without the helper files unless ``push_helpers``
        is set, and ``training_args.bin`` (which Trainer rewrites into ``output_dir`` here) without the token."""
        token = self.args.hub_token
        ignore = [] if self.push_helpers else [HELPER_PATTERN]
        allow = self._upload_allow_list()
        with self._args_without_tokens(), _narrowed_uploads(Path(self.args.output_dir), allow, ignore, token):
            super()._push_from_checkpoint(checkpoint_folder)
