"""Helpers that let the trainers run unchanged under ``torchrun`` / ``accelerate launch`` (data parallelism).

Accelerate owns the process group, the DDP wrapping, per-rank data sharding and the collectives;
this module holds what it leaves to the caller:

- :func:`has_accelerator`: on a machine with no GPU-like device, accelerate joins the process group
  started by ``torchrun`` only when told ``cpu=True`` (it then uses gloo); otherwise every process
  silently trains alone on the whole data.
- :func:`call_in_forward`: DDP all-reduces gradients (and FSDP gathers parameters) only for work done
  inside the wrapper's ``forward``. Code that reads a model's parts directly, as
  :func:`distreward.sequence_logprobs` does (the trunk, then the LM head chunk by chunk), must be
  routed through that ``forward``: the "forward redirection" of PyTorch Lightning and TRL.
- :func:`check_data_parallel`: the trainers save, load and sample from the unwrapped model, which
  only data parallelism keeps whole on every process; sharded engines are refused, not run wrong.
"""
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, extract_model_from_parallel

SHARDED_TYPES = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)


def has_accelerator() -> bool:
    """True when torch sees a GPU-like device (CUDA, ROCm, XPU, MPS, ...)."""
    if hasattr(torch, "accelerator"):  # torch >= 2.6
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def check_data_parallel(accelerator: Accelerator) -> None:
    """Raise ValueError if ``accelerator`` shards the model (an FSDP, DeepSpeed or Megatron-LM launch config)."""
    if accelerator.distributed_type in SHARDED_TYPES:
        raise ValueError(f"{accelerator.distributed_type.value} is not supported yet (checkpoints and rollouts need "
                         f"the whole model on every process): launch without it, for DDP")


def call_in_forward(model: torch.nn.Module, function: Callable, *args):
    """``function(module, *args)`` computed as the forward of ``model``, where ``module`` is the bare model
    that ``model`` wraps (``DistributedDataParallel``, FSDP, or ``model`` itself).

    The bare model's ``forward`` is swapped for ``function`` during one call of ``model``, so the
    wrapper's pre- and post-forward run around it: under DDP the parameters that ``function`` uses
    have their gradients all-reduced in ``backward``, exactly as for ``model(...)``. ``args`` go
    through the wrapper (tensors, or dataclasses of tensors).
    """
    module = extract_model_from_parallel(model)
    patched = module.__dict__.get("forward")  # an instance-level forward (accelerate's autocast wrapper)

    def restore():
        if patched is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = patched

    def redirected(*inner_args):
        restore()  # ``function`` may call the real forward itself
        return function(module, *inner_args)

    module.forward = redirected
    try:
        return model(*args)
    finally:
        restore()
