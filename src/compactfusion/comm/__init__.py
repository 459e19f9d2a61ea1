"""Communication layer: every byte between ranks goes through a :class:`Communicator`.

* :class:`LinkModel` - alpha-beta link model (``cost(b) = latency + b / bandwidth``) with modes
  ``off`` / ``sleep`` / ``virtual``.
* :class:`ByteLedger` - bytes sent vs. uncompressed bytes per (layer, step, tensor, peer).
* :class:`Communicator` - timeouts on every op (:class:`CommTimeoutError`), backend failures as
  :class:`CommError`, ledger + link accounting; :func:`make_mesh_groups` for cfg x ulysses x ring.
* :mod:`.device` - which device a control or payload tensor travels on for a group's backend.
* :mod:`.control` - control objects as tagged JSON (never pickle).
"""
from .errors import CommError, CommTimeoutError
from .device import control_device, transport_device
from .group import (CommHandle, Communicator, MeshGroup, make_mesh_communicators, make_mesh_groups,
                    mesh_partition, summary_all_ranks)
from .ledger import ByteLedger
from .link import LinkModel, format_bandwidth, format_latency, parse_bandwidth, parse_latency

__all__ = [
    "ByteLedger", "CommError", "CommHandle", "CommTimeoutError", "Communicator", "LinkModel", "MeshGroup",
    "format_bandwidth", "format_latency", "make_mesh_communicators", "make_mesh_groups", "mesh_partition",
    "parse_bandwidth", "parse_latency", "summary_all_ranks", "control_device", "transport_device",
]
