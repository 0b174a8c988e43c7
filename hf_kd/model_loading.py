"""Keyword arguments for ``from_pretrained``, from a config's ``model_init_kwargs`` / ``teacher_model_init_kwargs``."""

from __future__ import annotations

from typing import Any

import torch


def parse_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; ``"auto"`` and dtypes pass through. An unknown name is an error."""
    if not isinstance(dtype, str) or dtype == "auto":
        return dtype
    parsed = getattr(torch, dtype, None)
    if not isinstance(parsed, torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}: use 'auto' or a torch dtype name such as 'float32' or 'bfloat16'.")
    return parsed


def init_kwargs(kwargs: dict[str, Any] | None, default_dtype: str, trust_remote_code: bool = False) -> dict[str, Any]:
    """``kwargs`` with a parsed ``dtype`` (``default_dtype`` when unset) and ``trust_remote_code`` (the config's
    `trust_remote_code` unless ``kwargs`` set it, as TRL's trainers do), ready for ``from_pretrained``."""
    kwargs = dict(kwargs or {})
    kwargs["dtype"] = parse_dtype(kwargs.get("dtype") or default_dtype)
    kwargs.setdefault("trust_remote_code", trust_remote_code)
    return kwargs


def config_kwargs(kwargs: dict[str, Any] | None, trust_remote_code: bool = False) -> dict[str, Any]:
    """The ``AutoConfig.from_pretrained`` arguments of a model loaded with ``kwargs``: its revision and
    ``trust_remote_code`` (as :func:`init_kwargs` resolves it), so that its config is read from what is loaded."""
    kwargs = kwargs or {}
    found = {"trust_remote_code": kwargs.get("trust_remote_code", trust_remote_code)}
    return found | ({"revision": kwargs["revision"]} if kwargs.get("revision") else {})
