"""Which device a message's tensor must live on, given its process group's backend.

One place decides (the rule is small but easy to get wrong in several):

* **Control tensors** (sizes, agreement fingerprints, ledger rows, barriers) go on
  :func:`control_device`: the CPU whenever the group has a CPU backend (``gloo``, or the ``cpu:gloo``
  half of a mixed ``cpu:gloo,cuda:nccl`` group), else the current CUDA device (NCCL-only group).
  CPU control data on a mixed group never wakes NCCL and needs no device sync to build.
* **Payload tensors** stay on their own device when the group has a point-to-point backend for it
  (:func:`transport_device`: CUDA tensors on ``nccl``, CPU tensors on ``gloo``); otherwise they are
  staged through the control device (CUDA tensors on a gloo-only group are copied to the CPU and back:
  correct, slow, meant for tests and one-GPU debugging).
* NCCL point-to-point ops of one exchange must be issued together (:func:`batched_p2p`): NCCL runs
  a pair's sends and receives on one stream, so a receive posted before the matching send on both
  sides would wait forever.

NCCL builds a communicator at a group's (or a pair's) first op and blocks, with no timeout, until the
peers join; :func:`cuda_init_kwargs` binds the device so the default group forms at start-up instead.

Timeouts on NCCL: ``Work.wait(timeout=...)`` blocks the host until the work completes or the timeout
passes, then aborts the communicator and raises (torch >= 2.2), which :func:`~.errors.wait_works`
turns into :class:`~.errors.CommTimeoutError`. The *group* timeout drives NCCL's watchdog thread,
which (default ``TORCH_NCCL_ASYNC_ERROR_HANDLING=3``) kills the process without a Python error;
:func:`group_timeout` gives groups a longer timeout than our per-op deadline so our error always
comes first, and :func:`nccl_environment` sets ``TORCH_NCCL_ASYNC_ERROR_HANDLING=2`` (abort the
communicators, leave the process to raise) unless the user chose otherwise.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, MutableMapping

import torch
import torch.distributed as dist

__all__ = ["backend_map", "control_device", "transport_device", "batched_p2p", "group_timeout",
           "nccl_environment", "cuda_init_kwargs", "init_distributed", "GROUP_TIMEOUT_GRACE_S"]

#: Extra seconds a group's (watchdog) timeout gets over the per-op deadline.
GROUP_TIMEOUT_GRACE_S = 10.0

# Devices each plain backend name serves (as torch's BackendConfig maps them).
_CAPABILITY = {"gloo": ("cpu", "cuda"), "nccl": ("cuda",), "mpi": ("cpu", "cuda"), "ucc": ("cpu", "cuda")}
# Point-to-point on device memory: gloo reads host pointers, so CUDA tensors on gloo are staged.
_P2P_NATIVE = {("cpu", "gloo"), ("cpu", "mpi"), ("cpu", "ucc"), ("cuda", "nccl"), ("cuda", "ucc")}


def backend_map(group_or_backend: Any = None) -> dict[str, str]:
    """``{device type: backend}`` of a group (None = WORLD) or of a backend string such as ``"gloo"``,
    ``"nccl"`` or ``"cpu:gloo,cuda:nccl"`` (a map passes through)."""
    if isinstance(group_or_backend, dict):  # already a map
        return dict(group_or_backend)
    spec = group_or_backend if isinstance(group_or_backend, str) else str(dist.get_backend(group_or_backend))
    spec = spec.strip().lower()
    if ":" not in spec:
        if spec not in _CAPABILITY:
            raise ValueError(f"unknown process-group backend {spec!r}; use gloo, nccl or a map like 'cpu:gloo,cuda:nccl'")
        return {d: spec for d in _CAPABILITY[spec]}
    out: dict[str, str] = {}
    for part in spec.split(","):
        dev, sep, b = part.strip().partition(":")
        if not sep or not dev or not b:
            raise ValueError(f"backend map {spec!r} not understood; use e.g. 'cpu:gloo,cuda:nccl'")
        out[dev] = b
    return out


def _current_cuda() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def control_device(group_or_backend: Any = None) -> torch.device:
    """Device for control tensors: CPU if the group serves CPU tensors, else the current CUDA device."""
    m = backend_map(group_or_backend)
    if "cpu" in m:
        return torch.device("cpu")
    if "cuda" in m:
        return _current_cuda()
    raise ValueError(f"process group backends {m} serve neither CPU nor CUDA tensors")


def transport_device(device: torch.device | str, group_or_backend: Any = None) -> torch.device:
    """Where a payload on ``device`` travels: ``device`` itself when its backend does point-to-point on
    it, else the group's control device (the tensor is staged there and back)."""
    device = torch.device(device)
    m = backend_map(group_or_backend)
    if (device.type, m.get(device.type)) in _P2P_NATIVE:
        return device
    return control_device(m)


def batched_p2p(device: torch.device | str, group_or_backend: Any = None) -> bool:
    """True when this device's backend needs one batch (``batch_isend_irecv``) per exchange."""
    return backend_map(group_or_backend).get(torch.device(device).type) == "nccl"


def group_timeout(op_timeout_s: float) -> timedelta:
    """Process-group timeout for ops waited with ``op_timeout_s``: later, so our named error comes first."""
    return timedelta(seconds=float(op_timeout_s) + GROUP_TIMEOUT_GRACE_S)


def nccl_environment(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set (unless already set) the NCCL variables our timeouts rely on; returns what was set.

    Call before ``init_process_group``. ``TORCH_NCCL_ASYNC_ERROR_HANDLING=2`` ("clean up only"): on a
    failed or timed-out op the watchdog aborts the communicators instead of killing the process, so
    the :class:`CommTimeoutError` raised by our own wait reaches the user.
    """
    env = os.environ if environ is None else environ
    wanted = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}
    done = {}
    for k, v in wanted.items():
        if k not in env:
            env[k] = v
            done[k] = v
    return done


def cuda_init_kwargs(local_rank: int, timeout_s: float) -> dict[str, Any]:
    """Arguments for ``dist.init_process_group`` on CUDA ranks (call ``torch.cuda.set_device(local_rank)``
    and :func:`nccl_environment` first): gloo carries CPU control data, NCCL the device payloads.

    ``device_id`` binds the process to its GPU, which makes NCCL build the communicator during
    ``init_process_group`` (inside its timeout) rather than lazily at the first data op, where NCCL
    blocks without any timeout until every peer joins."""
    if isinstance(local_rank, bool) or not isinstance(local_rank, int) or local_rank < 0:
        raise ValueError(f"local_rank must be an integer >= 0, got {local_rank!r}")
    return {"backend": "cpu:gloo,cuda:nccl", "timeout": group_timeout(timeout_s),
            "device_id": torch.device("cuda", local_rank)}


def init_distributed(device: torch.device | str, timeout_s: float, **kw: Any) -> None:
    """``init_process_group`` the way this package expects, for a rank computing on ``device``.

    CUDA: ``torch.cuda.set_device``, :func:`nccl_environment`, then backend ``cpu:gloo,cuda:nccl`` bound to
    the device (:func:`cuda_init_kwargs`). CPU: gloo. Either way the group timeout is
    :func:`group_timeout` of ``timeout_s``. ``kw`` passes ``store``/``rank``/``world_size`` through
    (default: torchrun's environment variables).
    """
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        nccl_environment()
        dist.init_process_group(**cuda_init_kwargs(index, timeout_s), **kw)
    else:
        dist.init_process_group("gloo", timeout=group_timeout(timeout_s), **kw)
