"""Tests for compactfusion.comm: link model parsing/costs, ledger, and the gloo Communicator.

The distributed checks run in two spawns (about 3-7 s each): one 4-rank group checks every data op,
the ledger and the virtual clock against the cost formula; one 2-rank group checks timeouts and
backend errors and that the group still exits cleanly.
"""
from __future__ import annotations

import math
import pickle
import time

import pytest

from compactfusion.comm import (ByteLedger, CommError, CommTimeoutError, LinkModel, mesh_partition, parse_bandwidth,
                                parse_latency)
from distributed import run_distributed

# ---------------------------------------------------------------------------------------------
# LinkModel: parsing


@pytest.mark.parametrize("text,expected", [
    ("100MB/s", 100e6), ("1GB/s", 1e9), ("10Gbit/s", 10e9 / 8), ("500 MB/s", 500e6), ("25Gbps", 25e9 / 8),
    ("1.5GiB/s", 1.5 * 2**30), ("64KiB/s", 64 * 1024), ("8Mb/s", 1e6), ("100 kB/s", 1e5), ("3e8B/s", 3e8),
    ("1e9", 1e9), (" 2 GBps ", 2e9), ("1gbit/s", 1e9 / 8), (1e9, 1e9), (12345, 12345.0),
    ("inf", math.inf), ("unlimited", math.inf), ("Unlimited", math.inf), (None, math.inf), (math.inf, math.inf),
])
def test_parse_bandwidth_valid(text, expected):
    assert parse_bandwidth(text) == expected


@pytest.mark.parametrize("bad", [
    "fast", "-5MB/s", "0", 0, -1.0, "MB/s", "1 0MB/s", "100MB", "5 furlongs/s", "1e9e9", "", "   ", "nan",
    float("nan"), "inf MB/s", True, "--1GB/s", "1.2.3MB/s", [1], "10 Gbit", "1mB/sec",
])
def test_parse_bandwidth_malformed(bad):
    with pytest.raises(ValueError, match=r"bandwidth .*(use a number of bytes/s|\"100MB/s\")"):
        parse_bandwidth(bad)


@pytest.mark.parametrize("text,expected", [
    ("20us", 20e-6), ("1ms", 1e-3), ("0.5 s", 0.5), ("0", 0.0), ("20 µs", 20e-6), ("250ns", 250e-9),
    (0, 0.0), (0.002, 0.002), ("3e-3", 3e-3),
])
def test_parse_latency_valid(text, expected):
    assert parse_latency(text) == expected


@pytest.mark.parametrize("bad", ["1h", "-1ms", -1, "inf", float("inf"), "abc", "", float("nan"), "1 m s", "ms", None])
def test_parse_latency_malformed(bad):
    with pytest.raises(ValueError, match=r"latency .*(use a number of seconds)"):
        parse_latency(bad)


def test_link_model_object():
    m = LinkModel("1GB/s", "20us", "virtual")
    assert (m.bandwidth, m.latency, m.mode) == (1e9, 20e-6, "virtual")
    assert LinkModel() == m and hash(LinkModel()) == hash(m) and len({m, LinkModel()}) == 1
    assert repr(m) == "LinkModel(bandwidth='1GB/s', latency='20us', mode='virtual')"
    for lm in (m, LinkModel("1.5GiB/s", 0.000123, "sleep"), LinkModel(None, 0, "off"), LinkModel(123456789.123, "7ns")):
        assert eval(repr(lm)) == lm  # noqa: S307 - round trip of our own repr
        assert LinkModel.from_dict(lm.to_dict()) == lm
        assert pickle.loads(pickle.dumps(lm)) == lm
    assert LinkModel(None, 0, "off").to_dict()["bandwidth_bytes_per_s"] is None
    assert LinkModel(mode=" Sleep ").mode == "sleep"
    with pytest.raises(ValueError, match="link mode 'fast' not understood; use one of 'off', 'sleep', 'virtual'"):
        LinkModel(mode="fast")
    with pytest.raises(Exception):
        m.bandwidth = 5  # frozen


def test_link_costs():
    m = LinkModel("100MB/s", "50us")
    assert m.cost(0) == 50e-6
    assert m.cost(1_000_000) == 50e-6 + 1e6 / 100e6
    assert m.all_gather_cost(1000, 4) == 3 * (50e-6 + 1000 / 100e6)
    assert m.ring_hop_cost(4096) == 50e-6 + 4096 / 100e6
    assert m.all_to_all_cost([10, 0, 30]) == (50e-6 + 10 / 100e6) + (50e-6 + 30 / 100e6)  # empty: not sent
    assert m.op_cost([]) == 0.0
    assert LinkModel(None, "1ms").cost(10**12) == 1e-3
    with pytest.raises(ValueError):
        m.cost(-1)


# ---------------------------------------------------------------------------------------------
# ByteLedger


def test_ledger_aggregation():
    lg = ByteLedger()
    assert lg.summary()["compression_ratio"] == 1.0 and lg.summary()["messages"] == 0
    lg.record(0, 0, "k", 1, 100, 400, seconds=0.5, warmup=True)
    lg.record(0, 1, "k", 1, 10, 400, seconds=0.25)
    lg.record(1, 1, "v", 2, 30, 400, seconds=0.125)
    lg.record(1, 1, "v", 2, 0, 400)  # not transmitted: counts raw bytes, no message
    lg.record(1, 1, "v", 2, 20, 400)
    lg.record_control(64, 2)
    s = lg.summary()
    assert s["bytes_sent"] == 160 and s["bytes_uncompressed"] == 2000 and s["messages"] == 4
    assert s["compression_ratio"] == 2000 / 160 and s["modeled_comm_s"] == 0.875
    assert (s["bytes_sent_warmup"], s["bytes_uncompressed_warmup"]) == (100, 400)
    assert (s["bytes_sent_after_warmup"], s["bytes_uncompressed_after_warmup"]) == (60, 1600)
    assert s["compression_ratio_after_warmup"] == 1600 / 60
    assert (s["control_bytes"], s["control_messages"]) == (64, 2)
    assert list(lg.by_step()) == [0, 1] and lg.by_step()[1]["bytes_sent"] == 60
    assert lg.by_layer()[1] == {"bytes_sent": 50, "bytes_uncompressed": 1200, "messages": 2,
                                "modeled_comm_s": 0.125, "compression_ratio": 24.0}
    assert lg.by_tensor()["k"]["bytes_sent"] == 110 and lg.by_peer()[2]["messages"] == 2
    assert lg.group_by("layer", "tensor")[(1, "v")]["bytes_uncompressed"] == 1200
    assert sum(r["bytes_sent"] for r in lg.records()) == 160

    other = ByteLedger()
    other.record(0, 0, "k", 1, 5, 7)
    other.record("out", None, "out", 0, 3, 3)  # mixed key types must not break grouping
    merged = ByteLedger.merged([lg, other])
    assert merged.summary()["bytes_sent"] == 168 and merged.summary()["control_bytes"] == 64
    assert merged.by_step()[0]["bytes_sent"] == 105 and set(merged.by_layer()) == {0, 1, "out"}
    assert lg.summary()["bytes_sent"] == 160  # merged() leaves inputs alone
    assert pickle.loads(pickle.dumps(lg)).summary() == s
    lg.reset()
    assert lg.summary()["bytes_sent"] == 0 and lg.summary()["control_bytes"] == 0 and len(lg) == 0


def test_mesh_partition():
    p = mesh_partition(8, {"cfg": 2, "ulysses": 2, "ring": 2})
    assert p["ring"] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert p["ulysses"] == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert p["cfg"] == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert mesh_partition(4, {"ring": 4, "cfg": 1})["cfg"] == [(0,), (1,), (2,), (3,)]
    with pytest.raises(ValueError, match="multiply to 6"):
        mesh_partition(4, {"a": 2, "b": 3})
    with pytest.raises(ValueError):
        mesh_partition(2, {"a": 0})


def test_errors_pickle():
    from compactfusion.comm.errors import OpContext
    e = CommTimeoutError("boom", OpContext("all_gather_bytes", 3, 7, "kv", (0, 1), 2.0))
    e2 = pickle.loads(pickle.dumps(e))
    assert isinstance(e2, CommTimeoutError) and isinstance(e2, CommError) and isinstance(e2, RuntimeError)
    assert (e2.op, e2.layer, e2.step, e2.tensor, e2.ranks, e2.timeout_s) == ("all_gather_bytes", 3, 7, "kv", (0, 1), 2.0)


# ---------------------------------------------------------------------------------------------
# Distributed: every op on 4 gloo ranks, checked in one spawn


def _payload(r: int, n: int):
    import torch
    return ((torch.arange(n, dtype=torch.int64) * 7 + r * 31) % 256).to(torch.uint8)


def _ops_main(rank: int, world: int):
    import torch

    from compactfusion.comm import (ByteLedger, CommError, Communicator, LinkModel, make_mesh_communicators,
                                    make_mesh_groups)

    link = LinkModel("100MB/s", "50us", "virtual")
    ledger = ByteLedger()
    comm = Communicator(None, link, ledger, timeout_s=30.0)
    assert (comm.rank, comm.size, comm.ranks) == (rank, world, tuple(range(world)))
    W, me = world, rank
    exp_sent: dict[str, int] = {}
    exp_unc: dict[str, int] = {}
    exp_msgs = 0
    exp_time = 0.0

    def expect(tensor, sent, unc):
        nonlocal exp_msgs, exp_time
        exp_sent[tensor] = exp_sent.get(tensor, 0) + sent
        exp_unc[tensor] = exp_unc.get(tensor, 0) + unc
        if sent > 0:
            exp_msgs += 1
            exp_time += link.latency + sent / link.bandwidth

    # 1. variable-size all-gather, one rank with an empty payload
    sizes = [3, 17, 0, 40][:W]
    outs = comm.all_gather_bytes(_payload(me, sizes[me]), sizes, layer=0, step=0, tensor="kv",
                                 uncompressed_nbytes=4 * sizes[me])
    assert [o.numel() for o in outs] == sizes
    for r in range(W):
        assert torch.equal(outs[r], _payload(r, sizes[r])), r
    for _ in range(W - 1):
        expect("kv", sizes[me], 4 * sizes[me])

    # 2. uneven all-to-all (zero-size chunks included)
    def a2a_size(i, j):
        return (i + 2 * j) % 5

    chunks = [torch.full((a2a_size(me, j),), 16 * me + j, dtype=torch.uint8) for j in range(W)]
    got = comm.all_to_all_bytes(chunks, [a2a_size(i, me) for i in range(W)], layer=1, step=0, tensor="q",
                                uncompressed_nbytes=[2 * a2a_size(me, j) for j in range(W)])
    for i in range(W):
        assert torch.equal(got[i], torch.full((a2a_size(i, me),), 16 * i + me, dtype=torch.uint8)), i
    for j in range(W):
        if j != me:
            expect("q", a2a_size(me, j), 2 * a2a_size(me, j))

    # 3. ring rotation of per-rank float blocks of different sizes, overlapped with local work
    nxt, prv = (me + 1) % W, (me - 1) % W
    block = torch.full((me + 1, 3), float(me))
    seen = {me: block}
    cur_owner = me
    for hop in range(W - 1):
        src_owner = (cur_owner - 1) % W
        h = comm.ring_exchange(seen[cur_owner], (src_owner + 1, 3), dst=nxt, src=prv, layer=2, step=hop, tensor="kv")
        _ = torch.randn(64, 64) @ torch.randn(64, 64)  # compute while the hop is in flight
        expect("kv", seen[cur_owner].numel() * 4, seen[cur_owner].numel() * 4)
        seen[src_owner] = h.wait()
        assert h.wait() is seen[src_owner]  # idempotent
        cur_owner = src_owner
    for r in range(W):
        assert torch.equal(seen[r], torch.full((r + 1, 3), float(r))), r

    # 4. async all-gathers (bytes and a bf16 tensor) in flight together with a ring hop
    xs = torch.arange(6, dtype=torch.float32).reshape(2, 3).to(torch.bfloat16) + me
    h1 = comm.all_gather_tensors_async(xs, layer=3, step=1, tensor="k", warmup=True)
    h2 = comm.all_gather_async(_payload(me, 5 + me), [5 + r for r in range(W)], layer=3, step=1, tensor="v")
    h3 = comm.ring_exchange(torch.tensor([me], dtype=torch.int64), 1, dst=nxt, src=prv, layer=3, step=1, tensor="o")
    assert h3.wait().item() == prv
    gx = h1.wait()
    assert all(torch.equal(gx[r], torch.arange(6, dtype=torch.float32).reshape(2, 3).to(torch.bfloat16) + r)
               for r in range(W))
    assert gx[me] is xs
    assert all(torch.equal(o, _payload(r, 5 + r)) for r, o in enumerate(h2.wait()))
    assert math.isclose(h2.modeled_s, (W - 1) * link.cost(5 + me), rel_tol=1e-12) and h2.nbytes_sent == (W - 1) * (5 + me)
    for _ in range(W - 1):
        expect("k", 12, 12)
        expect("v", 5 + me, 5 + me)
    expect("o", 8, 8)

    # 5. control ops: not data bytes, not in the link model
    before = ledger.summary()
    objs = comm.all_gather_object({"rank": me, "pad": "x" * me})
    assert [o["rank"] for o in objs] == list(range(W))
    assert comm.broadcast_object({"cfg": 42} if me == 1 else None, src=1) == {"cfg": 42}
    assert comm.assert_same("hash-abc", what="config hash") == "hash-abc"
    try:
        comm.assert_same(f"hash-{me // 2}", what="config hash")
        raise AssertionError("assert_same should raise")
    except ValueError as e:
        assert "config hash differs" in str(e)
    sums = {(0, "k", r): 2**64 + r for r in range(W)}  # stream checksums: tuple keys, big ints
    sums[(1, "v", me, (me + 1) % W)] = me
    got = comm.all_gather_object((sums, [1.5, float("inf"), None, True], "dtype"))
    assert got[(me + 1) % W][0][(1, "v", (me + 1) % W, (me + 2) % W)] == (me + 1) % W
    assert all(g[1][1] == float("inf") and type(g[1]) is list and g[2] == "dtype" for g in got)
    for call in (lambda: comm.all_gather_object({1, 2} if me == 2 % W else "fine"),
                 lambda: comm.broadcast_object(object() if me == 0 else None, src=0)):
        try:  # a refused object raises on every rank (the sender names its type, peers name the rank)
            call()
            raise AssertionError("unsendable object accepted")
        except TypeError as e:
            assert ("cannot be sent" in str(e)), str(e)
    import compactfusion.comm.group as group_mod
    group_mod.MAX_CONTROL_BYTES, cap = 100, group_mod.MAX_CONTROL_BYTES
    for call in (lambda: comm.all_gather_object("x" * (200 if me == 1 else 5)),
                 lambda: comm.broadcast_object("y" * 300 if me == 1 else None, src=1)):
        try:  # an oversized control object is refused on every rank, none allocates or waits for it
            call()
            raise AssertionError("oversized object accepted")
        except ValueError as e:
            assert "exceeds" in str(e) or "over 100 bytes" in str(e), str(e)
    group_mod.MAX_CONTROL_BYTES = cap
    t = torch.tensor([me + 1.0])
    assert comm.all_reduce(t, "sum").item() == sum(range(1, W + 1))
    # NCCL's code path (one batch_isend_irecv per exchange), run here on gloo
    batched = Communicator(None, link, ByteLedger(), timeout_s=30.0)
    batched.backends = {"cpu": "nccl"}
    assert [int(v) for v in batched.all_gather_tensors(torch.tensor([me * 3]))] == [3 * r for r in range(W)]
    assert batched.ring_exchange(torch.tensor([me]), 1, dst=nxt, src=prv).wait().item() == prv
    assert batched.all_gather_object(("x", me)) == [("x", r) for r in range(W)]
    comm.barrier()
    after = ledger.summary()
    assert {k: after[k] for k in ("bytes_sent", "messages", "modeled_comm_s")} == \
        {k: before[k] for k in ("bytes_sent", "messages", "modeled_comm_s")}
    assert after["control_bytes"] > before["control_bytes"] and after["control_messages"] > 0

    # ledger: exact bytes per rank, virtual time = the formula
    s = ledger.summary()
    assert s["bytes_sent"] == sum(exp_sent.values()), (s, exp_sent)
    assert s["bytes_uncompressed"] == sum(exp_unc.values())
    assert s["messages"] == exp_msgs
    assert math.isclose(s["modeled_comm_s"], exp_time, rel_tol=1e-12), (s["modeled_comm_s"], exp_time)
    assert {t_: d["bytes_sent"] for t_, d in ledger.by_tensor().items()} == exp_sent
    assert s["bytes_sent_warmup"] == exp_sent["k"]
    assert set(ledger.by_peer()) == set(range(W)) - {me}
    mine = {k: s[k] for k in ("bytes_sent", "bytes_uncompressed", "messages", "modeled_comm_s")}
    from compactfusion.comm import summary_all_ranks
    tot = summary_all_ranks(ledger, timeout_s=10)
    assert tot["world_size"] == W and tot["per_rank"][me]["bytes_sent"] == s["bytes_sent"]
    assert tot["bytes_sent"] == sum(d["bytes_sent"] for d in tot["per_rank"])
    assert tot["modeled_comm_s"] == max(d["modeled_comm_s"] for d in tot["per_rank"])

    # 6. check_sizes: a wrong size claim raises CommError on every rank; the communicator stays usable
    checked = Communicator(None, link, ByteLedger(), timeout_s=30.0, check_sizes=True)
    good = [4] * W
    claim = list(good)
    if me == 3 % W:
        claim[0] = 9  # this rank expects 9 bytes from rank 0, which sends 4
    try:
        checked.all_gather_bytes(_payload(me, 4), claim)
        raise AssertionError("size mismatch not detected")
    except CommError as e:
        assert "sizes disagree" in str(e) and "all_gather_bytes" in str(e)
    assert all(torch.equal(o, _payload(r, 4)) for r, o in enumerate(checked.all_gather_bytes(_payload(me, 4), good)))
    h = checked.ring_exchange(torch.zeros(2 + me, dtype=torch.uint8), 2 + prv, dst=nxt, src=prv)
    assert h.wait().numel() == 2 + prv

    # 7. meshes and subgroups (created by every rank in the same order)
    groups = make_mesh_groups(W, {"ulysses": 2, "ring": W // 2})
    assert groups["ring"].ranks == tuple(range((me // (W // 2)) * (W // 2), (me // (W // 2) + 1) * (W // 2)))
    assert groups["ring"].index == me % (W // 2)
    comms = make_mesh_communicators({"ulysses": 2, "ring": W // 2}, link=link, timeout_s=30.0)
    for name, c in comms.items():
        g = c.all_gather_tensors(torch.tensor([me]), tensor=name)
        assert [int(v) for v in g] == list(c.ranks), (name, g)
    sub = comm.subgroup([1, 2, 3][: W - 1])
    if me in (1, 2, 3)[: W - 1]:
        assert sub.ranks == (1, 2, 3)[: W - 1] and sub.rank == me - 1
        assert [int(v) for v in sub.all_gather_tensors(torch.tensor([me * 10]))] == [10 * r for r in sub.ranks]
    else:
        assert sub is None

    # 8. sleep mode pads the real time up to the model: 3 sends of 50 kB at 1 MB/s = 0.15 s
    slow = Communicator(None, LinkModel("1MB/s", 0, "sleep"), ByteLedger(), timeout_s=30.0)
    t0 = time.monotonic()
    slow.all_gather_bytes(_payload(me, 50_000), [50_000] * W)
    took = time.monotonic() - t0
    assert took >= (W - 1) * 0.05 - 1e-3, took
    assert math.isclose(slow.ledger.summary()["modeled_comm_s"], (W - 1) * 0.05, rel_tol=1e-12)

    # 9. one-to-many pair sends in sleep mode: the last rank's link carries its messages one after another,
    # so receiver r (behind r others) gets its 20 kB at 1 MB/s after (r + 1) x 20 ms
    slow.barrier()
    t0 = time.monotonic()
    if me == W - 1:
        for h in [slow.pair_send(_payload(me, 20_000), r, tensor="out") for r in range(W - 1)]:
            h.wait()
        arrived = None
    else:
        got = slow.pair_recv(20_000, W - 1, tensor="out", behind=me).wait()
        arrived = time.monotonic() - t0
        assert torch.equal(got, _payload(W - 1, 20_000))
        assert arrived >= (me + 1) * 0.02 - 1e-3, (me, arrived)
    return {"summary": s, "exp_time": exp_time, "total": {k: v for k, v in tot.items() if k != "per_rank"},
            "sleep_took": took}


@pytest.mark.dist
def test_communicator_ops_4_ranks():
    res = run_distributed(_ops_main, 4, timeout=120)
    link = LinkModel("100MB/s", "50us", "virtual")
    sizes = [3, 17, 0, 40]
    for r, out in enumerate(res):
        s = out["summary"]
        # the all-gather part of rank r's clock, by the documented formula, is part of its total
        assert s["modeled_comm_s"] >= (0 if sizes[r] == 0 else 3 * (link.latency + sizes[r] / link.bandwidth))
        assert math.isclose(s["modeled_comm_s"], out["exp_time"], rel_tol=1e-12)
    tot = res[0]["total"]
    assert all(o["total"] == tot for o in res)  # every rank got the same reduction
    assert tot["bytes_sent"] == sum(o["summary"]["bytes_sent"] for o in res)
    assert tot["messages"] == sum(o["summary"]["messages"] for o in res)


# ---------------------------------------------------------------------------------------------
# Distributed: timeouts and backend errors on 2 ranks

TIMEOUT_S = 2.0


def _failure_main(rank: int, world: int):
    import torch

    from compactfusion.comm import ByteLedger, CommError, CommTimeoutError, Communicator, LinkModel

    world_comm = Communicator(None, LinkModel(mode="off"), ByteLedger(), timeout_s=10.0)
    doomed = world_comm.subgroup([0, 1])  # its connections get torn down by rank 1 below
    p2p = world_comm.subgroup([0, 1], timeout_s=TIMEOUT_S)
    coll = world_comm.subgroup([0, 1], timeout_s=TIMEOUT_S)
    out = {}

    # A. peer closes its side: rank 0 must get CommError (not a timeout, not a hang)
    if rank == 1:
        doomed.close()
    world_comm.barrier()
    if rank == 0:
        t0 = time.monotonic()
        try:
            doomed.all_gather_bytes(torch.zeros(8, dtype=torch.uint8), [8, 8], layer=4, step=2, tensor="k")
            out["A"] = "no error"
        except CommTimeoutError as e:
            out["A"] = f"timeout instead of backend error: {e}"
        except CommError as e:
            out["A"] = ("CommError", str(e), time.monotonic() - t0)
    world_comm.barrier()

    # B. rank 1 skips an all-gather; C. rank 1 skips an all-to-all
    if rank == 0:
        for key, call in (
            ("B", lambda: p2p.all_gather_bytes(torch.zeros(8, dtype=torch.uint8), [8, 8], layer=5, step=7, tensor="kv")),
            ("C", lambda: coll.all_to_all_bytes([torch.zeros(3, dtype=torch.uint8)] * 2, [3, 3], layer=6, step=8,
                                                tensor="q")),
        ):
            t0 = time.monotonic()
            try:
                call()
                out[key] = "no error"
            except CommTimeoutError as e:
                out[key] = ("CommTimeoutError", str(e), time.monotonic() - t0, e.op, e.layer, e.step, e.ranks)
        # a timed-out communicator refuses further ops at once (its op sequence no longer matches)
        t0 = time.monotonic()
        try:
            p2p.all_gather_bytes(torch.zeros(1, dtype=torch.uint8), [1, 1])
            out["D"] = "no error"
        except CommError as e:
            out["D"] = (type(e).__name__, str(e), time.monotonic() - t0)
    return out


@pytest.mark.dist
def test_timeouts_and_backend_errors():
    t0 = time.monotonic()
    res = run_distributed(_failure_main, 2, timeout=60)
    elapsed = time.monotonic() - t0
    r0 = res[0]
    assert r0["A"][0] == "CommError", r0["A"]
    assert "all_gather_bytes (layer=4, step=2, tensor='k')" in r0["A"][1] and r0["A"][2] < TIMEOUT_S + 5

    kind, msg, took, op, layer, step, ranks = r0["B"]
    assert kind == "CommTimeoutError" and op == "all_gather_bytes" and (layer, step, ranks) == (5, 7, (0, 1))
    assert "all_gather_bytes (layer=5, step=7, tensor='kv') on group ranks [0, 1]" in msg
    assert "2 s timeout" in msg and "skipped this op" in msg
    assert TIMEOUT_S - 0.1 <= took < TIMEOUT_S + 5, took

    kind, msg, took, op, layer, step, ranks = r0["C"]
    assert kind == "CommTimeoutError" and op == "all_to_all_bytes" and (layer, step) == (6, 8)
    assert TIMEOUT_S - 0.1 <= took < TIMEOUT_S + 5, took

    kind, msg, took = r0["D"]
    assert kind == "CommError" and "unusable after an earlier failure" in msg and took < 0.5
    assert elapsed < 60  # and run_distributed already checked that both ranks exited with code 0


# ---------------------------------------------------------------------------------------------
# The harness itself: a failing rank surfaces at once with its traceback, while its peer is stuck
# in a collective that would otherwise never return.


def _raise_on_rank1(rank: int, world: int):
    import torch.distributed as dist

    if rank == 1:
        raise ValueError("boom from rank 1")
    dist.barrier()


@pytest.mark.dist
def test_run_distributed_reports_rank_failure():
    from distributed import RankFailed

    t0 = time.monotonic()
    with pytest.raises(RankFailed, match=r"(?s)rank 1 .*_raise_on_rank1.*ValueError: boom from rank 1") as info:
        run_distributed(_raise_on_rank1, 2, timeout=60)
    assert isinstance(info.value.__cause__, ValueError)
    assert time.monotonic() - t0 < 30


# ---------------------------------------------------------------------------------------------
# A process whose op timed out must be able to exit normally (no destroy_process_group, peer still
# alive, WORLD with torch's default 30-min timeout). Plain subprocesses: the harness's tidy teardown
# would hide exactly this.

_EXIT_SCRIPT = r"""
import sys, time
from datetime import timedelta
import torch, torch.distributed as dist
from compactfusion.comm import Communicator
rank, port = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(1)
store = dist.TCPStore("127.0.0.1", port, 3, is_master=False, timeout=timedelta(seconds=30))
dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
comm = Communicator(timeout_s=1.5)
if rank == 1:
    print("READY", flush=True)
    time.sleep(60)  # alive, never joins; killed by the test
else:
    try:
        comm.all_to_all_bytes([torch.zeros(4, dtype=torch.uint8)] * 2, [4, 4], layer=0, step=0, tensor="q")
    finally:
        print("RAISING", time.monotonic(), flush=True)
"""


@pytest.mark.dist
def test_process_exits_after_timeout():
    import subprocess
    import sys
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, 3, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    procs = [subprocess.Popen([sys.executable, "-c", _EXIT_SCRIPT, str(r), str(store.port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        out, err = procs[0].communicate(timeout=60)
        exited = time.monotonic()
        assert procs[1].poll() is None, "peer should still be alive"
        assert procs[0].returncode == 1 and "CommTimeoutError: all_to_all_bytes (layer=0, step=0" in err, err[-2000:]
        raised = float(out.split("RAISING")[1].split()[0])
        # interpreter shutdown did not wait on the peer (a gloo collective here would block until the
        # group's 30-min timeout); the margin is for a loaded 2-core machine
        assert exited - raised < 15.0, exited - raised
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
