"""Control-message serialization (no pickle) and the device rules of compactfusion.comm.device (CPU only:
the CUDA device is mocked, the NCCL choices are decided from backend strings)."""
from __future__ import annotations

import math
from datetime import timedelta

import pytest
import torch

from compactfusion.comm import control, device


@pytest.mark.parametrize("obj", [
    None, True, 0, -7, 2**80, 1.5, -0.0, "x", "ünï", [], (), {},
    ((2, 77, 4, 64, "torch.bfloat16"), "s"),                       # shape signatures
    ((2, 5), "torch.float32"),
    {(0, "k", 0): 0xDEADBEEFCAFEF00D, (1, "v", 2, 3): 5},          # checksum tables keyed by stream tuples
    {"parallel configuration": "ab12", "attention layers": 4},    # fingerprint parts
    ("fp", {"compression.codec": "binary", "link.bandwidth_bytes_per_s": None, "tensors": ["k", "v"]}),
    {"per_rank": [{"bytes_sent": 3, "ratio": 1.25}], 1: [None, (True, False)]},
    [["L", 1], ("T",), {"D": "F"}],                                # user data that looks like our tags
])
def test_control_round_trip(obj):
    back = control.decode(control.encode(obj))
    assert back == obj and type(back) is type(obj) and repr(back) == repr(obj)


def test_control_nonfinite_and_types():
    got = control.decode(control.encode([math.inf, -math.inf, math.nan, (1, [2, (3,)])]))
    assert got[:2] == [math.inf, -math.inf] and math.isnan(got[2]) and got[3] == (1, [2, (3,)])
    assert type(got[3][1][1]) is tuple
    assert b"pickle" not in control.encode({"a": 1}) and control.encode({"a": 1}).startswith(b"[")


@pytest.mark.parametrize("bad", [{1, 2}, b"raw", torch.tensor(1), torch.float32, object(), [1, {2: bytearray()}],
                                 type("S", (str,), {})("sub")])
def test_control_refuses_non_data(bad):
    with pytest.raises(TypeError, match="cannot be sent between ranks"):
        control.encode(bad)


@pytest.mark.parametrize("data", [b"\x80\x04K\x01.", b"[\"X\",1]", b"{\"a\":1}", b"[\"D\",[1]]", b"[\"F\",\"big\"]",
                                  b"NaN", b"[\"D\",[[\"L\"],1]]", b"not json", b"[\"L\"," * 70 + b"1" + b"]" * 70])
def test_control_refuses_malformed(data):
    with pytest.raises(ValueError, match="malformed control message|nested deeper"):
        control.decode(data)


def test_every_current_caller_payload_encodes():
    """What the code base sends today: config agreement, shape signatures, checksums, fingerprint parts."""
    from compactfusion.api import _flat
    from compactfusion.parallel import ParallelConfig
    from compactfusion.comm import LinkModel
    from compactfusion.parallel.auto import auto_compression
    for cfg in (ParallelConfig(strategy="ring", compression="binary"),
                ParallelConfig(strategy="ulysses", link=LinkModel("1MB/s", "1ms", "sleep"),
                               compression=auto_compression(("binary", "int2"), floor="int2"))):
        msg = (cfg.fingerprint(), _flat(cfg.to_dict()))
        assert control.decode(control.encode(msg)) == msg


# ---- device rules -----------------------------------------------------------------------------

@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(device, "_current_cuda", lambda: torch.device("cuda", 3))


@pytest.mark.parametrize("backend,expected", [
    ("gloo", {"cpu": "gloo", "cuda": "gloo"}), ("nccl", {"cuda": "nccl"}),
    ("cpu:gloo,cuda:nccl", {"cpu": "gloo", "cuda": "nccl"}), ("CUDA:nccl, cpu:gloo", {"cpu": "gloo", "cuda": "nccl"}),
])
def test_backend_map_matches_torch(backend, expected):
    from torch.distributed.distributed_c10d import BackendConfig
    assert device.backend_map(backend) == expected
    assert device.backend_map(backend) == {k: str(v) for k, v in BackendConfig(backend.replace(" ", "").lower())
                                           .get_device_backend_map().items()}


def test_control_and_transport_devices(fake_cuda):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 3)
    # control tensors: CPU whenever the group has a CPU backend (mixed groups included), else the current GPU
    assert device.control_device("gloo") == cpu
    assert device.control_device("nccl") == gpu
    assert device.control_device("cpu:gloo,cuda:nccl") == cpu
    # payloads: stay where the backend carries them, else staged through the control device
    assert device.transport_device("cuda:3", "nccl") == gpu and device.transport_device("cpu", "nccl") == gpu
    assert device.transport_device("cuda:3", "gloo") == cpu and device.transport_device("cpu", "gloo") == cpu
    assert device.transport_device("cuda:3", "cpu:gloo,cuda:nccl") == gpu
    assert device.transport_device("cpu", "cpu:gloo,cuda:nccl") == cpu
    assert device.batched_p2p("cuda:0", "cpu:gloo,cuda:nccl") and not device.batched_p2p("cpu", "cpu:gloo,cuda:nccl")
    assert not device.batched_p2p("cuda:0", "gloo")
    for bad in ("fancy", "cpu=gloo,cuda", "cpu:,cuda:nccl"):
        with pytest.raises(ValueError, match="backend"):
            device.backend_map(bad)


def test_communicator_uses_its_groups_backend(monkeypatch, fake_cuda):
    """The Communicator asks the group's backend (mocked as each kind) and builds control tensors there."""
    import torch.distributed as dist

    from compactfusion.comm import Communicator
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    for backend, ctrl in (("nccl", "cuda"), ("gloo", "cpu"), ("cpu:gloo,cuda:nccl", "cpu")):
        monkeypatch.setattr(dist, "get_backend", lambda group=None, b=backend: b)
        c = Communicator(None, timeout_s=1.0, ranks=[0])
        assert c.control_device.type == ctrl, backend


def test_timeouts_and_cli_init(monkeypatch):
    assert device.group_timeout(30) == timedelta(seconds=30 + device.GROUP_TIMEOUT_GRACE_S)
    env = {}
    assert device.nccl_environment(env) == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"} == env
    env = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    assert device.nccl_environment(env) == {} and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"  # user's choice wins
    kw = device.cuda_init_kwargs(1, 20.0)
    assert kw == {"backend": "cpu:gloo,cuda:nccl", "timeout": timedelta(seconds=20 + device.GROUP_TIMEOUT_GRACE_S),
                  "device_id": torch.device("cuda", 1)}
    with pytest.raises(ValueError, match="local_rank"):
        device.cuda_init_kwargs(-1, 20.0)


def test_init_distributed_calls(monkeypatch):
    """What init_distributed passes to torch for a CUDA rank and a CPU rank (torch mocked)."""
    import torch.distributed as dist
    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(device, "nccl_environment", lambda: calls.append("nccl_env"))
    device.init_distributed("cuda:1", 30.0, rank=1, world_size=2)
    assert calls == [("set_device", 1), "nccl_env",
                     ((), {"backend": "cpu:gloo,cuda:nccl", "timeout": timedelta(seconds=40), "device_id": torch.device("cuda", 1),
                           "rank": 1, "world_size": 2})]
    calls.clear()
    device.init_distributed("cpu", 5.0)
    assert calls == [(("gloo",), {"timeout": timedelta(seconds=15)})]
