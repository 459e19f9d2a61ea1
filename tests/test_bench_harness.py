"""The benches share one spawner, one cost model (the library's) and the strategies' own traffic formulas."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from compactfusion.bench import project as P
from compactfusion.comm import LinkModel
from compactfusion.comm import link as linkmodel
from compactfusion.parallel.registry import REGISTRY, traffic_formula

BENCH = Path(P.__file__).parent


def _bench_trees():
    for path in sorted(BENCH.glob("*.py")):
        yield path.name, ast.parse(path.read_text())


def test_every_registry_strategy_is_priced_by_project_or_listed_not_modelled():
    m = P.MODELS["flux-dev-1024"]
    for name, spec in REGISTRY.items():
        formula = traffic_formula(name)
        if spec.traffic is None:
            assert formula is None and name in P.NOT_MODELLED and name not in P.STRATEGIES
            assert name in P.not_modelled_line()
            continue
        assert callable(formula) and name in P.STRATEGIES and name not in P.NOT_MODELLED
        rows = P.build_rows([m.key], [name], ["none", "int4"], [4], [], {})
        assert rows and {r["strategy"] for r in rows} == {name}, name
    assert set(P.STRATEGIES) == {n for n, s in REGISTRY.items() if s.traffic} | set(P.PEER_TRAFFIC)


def test_project_prices_the_registry_formula(monkeypatch):
    """bench project has no copy of a strategy's traffic: changing the library's formula changes its bytes."""
    import compactfusion.parallel.ring as ring
    from dataclasses import replace
    m = P.MODELS["flux-dev-1024"]
    before = P.traffic(m, "ring", "int4", 4)["layer_coded"]
    orig = ring.step_traffic

    def doubled(shape, wire):
        t = orig(shape, wire)
        return replace(t, layer=tuple(2 * b for b in t.layer))

    monkeypatch.setattr(ring, "step_traffic", doubled)
    assert P.traffic(m, "ring", "int4", 4)["layer_coded"] == [2 * b for b in before]


def test_unmodelled_strategy_is_refused_with_a_reason(tmp_path):
    from compactfusion.cli.main import main as cli
    name = next(iter(P.NOT_MODELLED))
    with pytest.raises(ValueError, match="no traffic formula"):
        P.traffic(P.MODELS["flux-dev-1024"], name, "none", 4)
    assert cli(["bench", "project", "--strategies", name, "--out", str(tmp_path), "--no-plots"]) == 2


def test_one_cost_model_linkmodel_and_benches(monkeypatch):
    """LinkModel, bench project, bench latency's virtual extension and bench comm all call comm.link.link_cost."""
    from compactfusion.bench.latency import virtual_time
    m = P.MODELS["flux-dev-1024"]
    t = P.default_step_time(m)
    link = P.Link("x", "x", 500e6, 20e-6)
    lm = LinkModel(bandwidth=500e6, latency=20e-6)
    assert lm.cost(1000, 3) == link.cost(1000, 3) == 3 * 20e-6 + 1000 / 500e6
    assert lm.cost(1000) == lm.op_cost([1000]) == 20e-6 + 1000 / 500e6
    base = {"wall_s": 1.0, "_per_rank_bytes": [10e6, 5e6], "_per_rank_msgs": [10, 10]}
    ring, vt = P.predict_latency(m, "ring", "none", 4, link, t), virtual_time(base, 10e6, 1e-3)
    orig = linkmodel.link_cost
    monkeypatch.setattr(linkmodel, "link_cost", lambda *a: 10 * orig(*a))
    assert lm.cost(1000, 3) == pytest.approx(10 * (3 * 20e-6 + 1000 / 500e6))
    assert P.predict_latency(m, "ring", "none", 4, link, t) > ring  # the projection moved with the model
    assert virtual_time(base, 10e6, 1e-3) == pytest.approx(1.0 + 10 * (vt - 1.0))
    calls = []
    monkeypatch.setattr(linkmodel, "link_cost", lambda *a: calls.append(a) or 0.0)
    from compactfusion.bench.comm import aggregate
    one = {"strategy": "ring", "codec": "none", "err2": [0.0], "ref2": [1.0], "wall_s": 0.0, "steady_bytes": 0,
           "steady_uncompressed": 0, "steady_messages": 0, "bytes_sent": 100, "bytes_uncompressed": 100,
           "messages": 2, "state_nbytes": 0}
    rows = aggregate(2, [[one], [one]], {"steps": 1, "warmup": 0}, 1e-3)
    assert calls and all(v == 0.0 for k, v in rows[0].items() if k.startswith("comm_s_per_step@"))


def test_no_bench_module_has_its_own_link_formula_or_spawner():
    """No ``x / bandwidth`` outside comm/link.py; multiprocessing only in bench/harness.py."""
    for name, tree in _bench_trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
                r = node.right
                ident = r.id if isinstance(r, ast.Name) else r.attr if isinstance(r, ast.Attribute) else ""
                assert "bandwidth" not in ident.lower() and ident.lower() not in ("bw", "bps"), \
                    f"bench/{name}:{node.lineno}: {ast.unparse(node)} (use comm.link.link_cost)"
            if isinstance(node, (ast.Import, ast.ImportFrom)) and name != "harness.py":
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any("multiprocessing" in x for x in mods), f"bench/{name}:{node.lineno}: use harness.run_ranks"
            if isinstance(node, ast.FunctionDef) and name != "harness.py":
                assert node.name not in ("run_ranks", "_rank_main"), f"bench/{name} defines {node.name}"


def test_run_ranks_is_the_harness_one():
    from compactfusion.bench import harness, quality
    assert quality.run_ranks is harness.run_ranks


def test_traffic_formulas_agree_with_their_strategy_semantics():
    """Peers reuse the library's formulas; DistriFusion moves patch's bytes; W=1 sends nothing."""
    m = P.MODELS["sd3-medium-1024"]
    patch, df = (P.traffic(m, s, "int4", 4) for s in ("patch", "distrifusion"))
    assert patch["layer_coded"] == df["layer_coded"] and (patch["overlap"], df["overlap"]) == ("none", "step")
    assert P.traffic(m, "diffusers-ring", "int4", 4)["layer_coded"] == P.traffic(m, "patch", "none", 4)["layer_raw"]
    assert P.traffic(m, "diffusers-ulysses", "none", 4, "split")["layer_msgs"] == 12
    for name in P.STRATEGIES:
        one = P.traffic(m, name, "int4", 1)
        assert one["layer_coded"] == [0] and one["layer_raw"] == [0] and one["gather"] == [0], name


# -- one method grammar (bench/methods.py) ------------------------------------------------------------

def test_method_names_parse_to_the_fields_the_benches_run():
    from compactfusion.bench.methods import method
    assert method("ring") == dict(name="ring", strategy="ring", codec="none", residual_order=None,
                                  error_feedback=None, family="exact")
    m = method("pipefusion+int4/o2/int8-warmup")
    assert (m["strategy"], m["codec"], m["residual_order"], m["error_feedback"], m["warmup_codec"], m["family"]) == \
        ("pipefusion", "int4", 2, True, "int8", "pipeline+compact")
    assert method("ring+int2/naive")["residual_order"] == 0 and method("ring+int2/naive")["family"] == "ablation"
    assert method("ring+binary/noef")["error_feedback"] is False
    assert method("ring+binary/o2auto")["delta_decay"] == "auto"
    assert (method("usp(2x2)")["ulysses_degree"], method("usp(2x2)")["ring_degree"]) == (2, 2)
    assert method("distrifusion+binary")["family"] == "stale+compact"
    assert method("ring+lowrank-int4-bpe:1.1/o2")["family"] == "compact (~1 bit)"


@pytest.mark.parametrize("bad, needle", [("rng+binary", "unknown strategy 'rng'"), ("ring+int3", "codec 'int3'"),
                                         ("ring/o2", "needs a codec"), ("ring+binary/o3", "unknown variant /o3"),
                                         ("", "a bench method")])
def test_bad_method_names_say_what_to_change(bad, needle):
    from compactfusion.bench.methods import method
    with pytest.raises(ValueError, match=re.escape(needle)):
        method(bad)


def test_every_default_bench_method_builds_a_library_config_and_new_names_need_no_bench_edit():
    """Every default of quality, latency and the video bench is a name of the grammar that builds a ParallelConfig;
    a codec registered tomorrow runs in every bench's --methods without editing it (here: a codec spec and a
    strategy x variant combination no default list holds)."""
    from compactfusion.bench import latency, quality, quality_video
    from compactfusion.bench.methods import method, parallel_config, selected
    names = [m["name"] for m in quality.methods()] + [m["name"] for m in latency.methods(4)] + \
        list(quality_video.DEFAULT_METHODS)
    for n in names:
        cfg = parallel_config(method(n))
        assert cfg.strategy == method(n)["strategy"]
    auto = parallel_config(method("ring+auto"))
    assert type(auto.compression.plan).__name__ == "AutoPlan"  # the per-layer choice, parallel/auto.py
    new = selected("pipefusion+topk:8/o2,ring+int8/int4-warmup,diffusers-ring", quality.methods())
    assert [m["name"] for m in new] == ["pipefusion+topk:8/o2", "ring+int8/int4-warmup"]  # peers: the bench's switch
    assert parallel_config(new[1]).compression.warmup_codec == "int4"
    assert selected(None, quality.methods()) == quality.methods()


def test_bench_codecs_covers_every_registry_codec_family():
    from compactfusion.bench.codecs import CODECS
    from compactfusion.codecs.registry import CODEC_SPECS, parse_codec_spec
    benched = {parse_codec_spec(c)[0] for c in CODECS}
    assert {parse_codec_spec(c)[0] for c in CODEC_SPECS if c != "fp32"} <= benched and "raw" in benched  # fp32 = raw
