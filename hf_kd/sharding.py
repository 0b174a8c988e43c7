"""Full weights of sharded heads and embedding tables, gathered only around the loss that reads them.

The fused loss and the DSKD bridge apply the models' output heads (and DSKD-CMA their embedding tables) outside
the forward passes. There, under FSDP2 (``torch.distributed.fsdp.fully_shard``) a parameter is a ``DTensor``
holding this rank's shard, and under DeepSpeed ZeRO-3 an empty placeholder. ``gathered(*modules)`` makes the
full parameters of the given modules (a head, an embedding table: never a whole model) visible for the duration
of a ``with`` block and puts the shards back afterwards.

Gradients reach the shards the way each framework reduces its own:

* FSDP2: a sharded parameter is replaced by ``param.full_tensor(grad_placements=Partial("avg"))``, an all-gather
  whose backward reduce-scatters the gradient with FSDP2's default averaging over the data-parallel ranks and
  accumulates it into the shard's ``.grad`` (where FSDP2 also adds the rest of the parameter's gradient, e.g. a tied
  embedding's). A parameter that FSDP2 still holds unsharded (the root module keeps its parameters gathered
  between forward and backward unless ``reshard_after_forward=True``) is left alone: FSDP2 reduces its gradient
  itself at the end of the backward pass.
* ZeRO-3: ``deepspeed.zero.GatheredParameters`` gathers the partitions (read-only, ``modifier_rank=None``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .atomic import write_atomically


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return None
    return DTensor


def is_zero3_parameter(param: torch.Tensor) -> bool:
    """A DeepSpeed ZeRO-3 partitioned parameter (it carries a ``ds_id``)."""
    return hasattr(param, "ds_id")


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The whole of an FSDP2 parameter, differentiable: its backward reduce-scatters the gradient, averaged over
    the mesh (FSDP2's default gradient reduction), into the shards."""
    from torch.distributed.tensor import Partial

    if not (param.requires_grad and torch.is_grad_enabled()):
        with torch.no_grad():
            return param.full_tensor()
    return param.full_tensor(grad_placements=[Partial("avg")] * param.device_mesh.ndim)


@contextlib.contextmanager
def gathered(*modules: nn.Module | None) -> Iterator[None]:
    """Within the block, the direct parameters of ``modules`` are whole (a no-op for unsharded modules).

    Pass the modules whose weights a loss reads outside the forward pass (``model.get_output_embeddings()``,
    ``model.get_input_embeddings()``); ``None`` entries are skipped. See the module docstring for gradients.
    """
    dtensor = _dtensor_type()
    unique = list({id(m): m for m in modules if m is not None}.values())
    swapped: list[tuple[nn.Module, str, torch.Tensor]] = []
    with contextlib.ExitStack() as stack:
        zero3 = [p for m in unique for p in m.parameters(recurse=False) if is_zero3_parameter(p)]
        if zero3:
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(zero3, modifier_rank=None))
        try:
            for module in unique:
                for name, param in list(module._parameters.items()):
                    if dtensor is not None and isinstance(param, dtensor):
                        module._parameters[name] = full_tensor(param)
                        swapped.append((module, name, param))
            yield
        finally:
            for module, name, param in reversed(swapped):
                module._parameters[name] = param


def _training_state(student: nn.Module, helpers: dict[str, nn.Module]) -> nn.ModuleDict:
    """Student and helper modules under one root, so that one optimizer's parameters all have names."""
    return nn.ModuleDict({"student": student, **{f"helper_{name}": module for name, module in helpers.items()}})


def save_sharded_checkpoint(
    folder: str, student: nn.Module, helpers: dict[str, nn.Module], optimizer: torch.optim.Optimizer
) -> None:
    """Every rank writes its shards of the student, the (replicated) helper modules and the optimizer state with
    `torch.distributed.checkpoint`; no rank ever holds the whole student. ``optimizer`` may mix student and helper
    parameters (as `DistillationTrainer.create_optimizer` does). Collective: call on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(_training_state(student, helpers), optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)


def load_sharded_checkpoint(
    folder: str, student: nn.Module, helpers: dict[str, nn.Module], optimizer: torch.optim.Optimizer
) -> None:
    """Restore what `save_sharded_checkpoint` wrote into models sharded the same way (exact resume)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    root = _training_state(student, helpers)
    model_state, optimizer_state = get_state_dict(root, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


HELPER_OPTIMIZER_FILE = "hf_kd_helper_optimizer.pt"


def _to_param(param: torch.Tensor, state: dict | None) -> dict | None:
    """Loaded optimizer state on its parameter's device (``step`` stays where torch keeps it: on the CPU)."""
    if state is None:
        return None
    return {k: v if k == "step" or not torch.is_tensor(v) else v.to(param.device) for k, v in state.items()}


@contextlib.contextmanager
def helper_optimizer_state_aside(
    optimizer: torch.optim.Optimizer, helper_params: list[torch.Tensor], folder: str, save: bool
) -> Iterator[None]:
    """Within the block the optimizer holds the student's parameter groups only; the helper modules' groups and
    state are written to (``save``) or read from ``folder``/``HELPER_OPTIMIZER_FILE``, then put back.

    accelerate's FSDP optimizer checkpoint (`save_fsdp_optimizer` / `load_fsdp_optimizer`, torch's
    `get_optimizer_state_dict(model, optimizer)`) names every optimizer parameter by the student's parameter names
    and fails (KeyError) on the helper modules' parameters, which live outside the student. The helpers are
    replicated on every rank, so their optimizer state is one small file written by rank 0.
    """
    ids = {id(p) for p in helper_params}
    positions = [i for i, g in enumerate(optimizer.param_groups) if any(id(p) in ids for p in g["params"])]
    groups = [optimizer.param_groups[i] for i in positions]
    if any(id(p) not in ids for g in groups for p in g["params"]):
        raise ValueError("A parameter group mixes helper-module and student parameters; give helpers their own.")
    params = [p for g in groups for p in g["params"]]
    state = [optimizer.state.pop(p, None) for p in params]
    for i in reversed(positions):
        del optimizer.param_groups[i]
    path = f"{folder}/{HELPER_OPTIMIZER_FILE}"
    try:
        yield
        if save:
            rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
            if rank0:
                settings = [{k: v for k, v in g.items() if k != "params"} for g in groups]
                write_atomically(path, lambda partial: torch.save({"param_groups": settings, "state": state}, partial))
        elif params:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            for group, settings in zip(groups, saved["param_groups"]):
                group.update(settings)
            state = [_to_param(p, s) for p, s in zip(params, saved["state"])]
    finally:
        for i, group in zip(positions, groups):  # ascending positions: each lands where it was
            optimizer.param_groups.insert(i, group)
        for p, s in zip(params, state):
            if s is not None:
                optimizer.state[p] = s


__all__ = [
    "HELPER_OPTIMIZER_FILE",
    "full_tensor",
    "gathered",
    "helper_optimizer_state_aside",
    "is_zero3_parameter",
    "load_sharded_checkpoint",
    "save_sharded_checkpoint",
]
