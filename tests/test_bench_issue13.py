"""Bench contract of issue 13 (no model runs): project ``warmup`` rows with exact compressed-warmup bytes,
quality ``bits_per_element`` from the ledger's attention-stream records."""
import pytest

from compactfusion.bench import project as P
from compactfusion.codecs import get_codec


def test_project_int8_warmup_bytes_and_ratio():
    m = P.MODELS["flux-dev-1024"]
    n, c, w = 1024, 3072, 4
    tr = P.traffic(m, "ring", "binary", w, warmup="int8")
    assert tr["layer_warm"] == [(w - 1) * 2 * get_codec("int8").encoded_nbytes(n, c)] * w
    assert P.traffic(m, "ring", "binary", w)["layer_warm"] == [(w - 1) * 2 * n * c * 2] * w  # fp16 default
    rows = P.build_rows(["flux-dev-1024"], ["ring"], ["none", "binary"], [4], [], {}, warmups=("fp16", "int8"))
    by = {(r["codec"], r["warmup"]): r for r in rows}
    assert set(by) == {("none", "none"), ("binary", "fp16"), ("binary", "int8")}
    assert by[("binary", "int8")]["image_bytes_vs_ring"] >= 12.5 > by[("binary", "fp16")]["image_bytes_vs_ring"]
    assert by[("binary", "int8")]["bytes_per_step"] == by[("binary", "fp16")]["bytes_per_step"]
    checks = P.headline_checks(rows)
    assert any("int8 warmup" in c["claim"] and c["ok"] for c in checks)


def test_project_rejects_bad_warmup_codec():
    from compactfusion.cli.main import main as cli
    assert cli(["bench", "project", "--warmup-codecs", "int9", "--out", "/tmp/x", "--no-plots"]) == 2


def test_quality_bits_per_element_from_ledger():
    from compactfusion.bench.quality import bits_per_element, stream_bytes
    from compactfusion.comm.ledger import ByteLedger
    led = ByteLedger()
    led.record(0, 0, "kv", 1, sent=4096, uncompressed=4096, warmup=True)  # warmup: excluded
    led.record(0, 1, "kv", 1, sent=130, uncompressed=4096)                # 1024 fp32 elements
    led.record(0, 1, "out", 1, sent=512, uncompressed=512)                # output gather: not a K/V stream
    sb = stream_bytes(led)
    assert sb == {"kv_bytes_sent_after_warmup": 130, "kv_bytes_uncompressed_after_warmup": 4096}
    assert bits_per_element(130, 4096, 4) == pytest.approx(130 * 8 / 1024)
    assert bits_per_element(0, 0, 4) is None


def test_quality_methods_quick_has_best_one_bit_and_warmup_methods():
    from compactfusion.bench.quality import BEST_ONE_BIT, methods, parallel_config
    quick = {m["name"]: m for m in methods(quick=True)}
    assert BEST_ONE_BIT in quick and "ring+binary/int8-warmup" in quick
    for m in methods():
        if m["codec"] != "none":
            comp = parallel_config(m).compression
            assert comp.warmup_codec == m.get("warmup_codec")


def test_quality_one_bit_section_and_sign_stats():
    import torch

    from compactfusion.bench.quality import BEST_ONE_BIT, one_bit_section, sign_stats
    rows = [dict(method="ring+binary", psnr=43.0, bits_per_element=1.13, bytes_per_image=4e6, family="compact"),
            dict(method=BEST_ONE_BIT, psnr=52.5, bits_per_element=1.09, bytes_per_image=3.9e6, family="compact"),
            dict(method="ring+int2", psnr=53.0, bits_per_element=2.13, bytes_per_image=5e6, family="compact")]
    g = torch.Generator().manual_seed(0)
    seqs = {0: [torch.randn(16, 8, generator=g) for _ in range(4)]}
    signs = sign_stats(seqs)
    assert 0.3 < signs["p_positive"] < 0.7 and 0.0 < signs["entropy_bits"] <= 1.0
    text = "\n".join(one_bit_section(rows, signs))
    assert f"**{BEST_ONE_BIT}**, 52.50 dB at 1.090 bits" in text and "+9.50" in text
