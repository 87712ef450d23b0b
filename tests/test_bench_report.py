"""vqtriton.bench: the comparison report (JSON, table, PNG) and the mismatch-rate helper."""

import json

import numpy as np
import pytest
import torch

import vqtriton as vqt
from vqtriton import bench
from vqtriton import reference as R

SHAPES = [(300, 37, 5), (64, 16, 3)]
# Providers whose package or module may be absent; the report skips them and says why.
OPTIONAL = {("layer", "vqtriton"), ("layer", "vqp")}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# torch's own inductor import (torch/utils/mkldnn.py) raises this once torch.compile is used.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return out, bench.run_report("cpu", SHAPES, out, warmup=0, reps=2)


def test_report_json_has_every_provider_and_shape(report):
    out, returned = report
    saved = json.loads((out / "report.json").read_text())
    assert saved == returned
    rows = {(r["op"], r["provider"], tuple(r["shape"])): r for r in saved["rows"]}
    expected = {(op, name, s) for op in bench.REPORT_OPS for name in bench.PROVIDERS[op] for s in SHAPES}
    assert set(rows) == expected and len(saved["rows"]) == len(expected)
    for (op, name, shape), r in rows.items():
        if r["skipped"]:
            assert (op, name) in OPTIONAL and "does not import" in r["skipped"], (op, name, r["skipped"])
            assert r["median_ms"] is None and r["ratio"] is None
            continue
        assert r["median_ms"] > 0, (op, name, shape)
        assert r["peak_mib"] is None  # CPU: no CUDA memory to measure
        ref = rows[op, "vqtriton", shape]["median_ms"]
        if ref is None:
            assert r["ratio"] is None
        else:
            assert r["ratio"] == pytest.approx(r["median_ms"] / ref, rel=1e-12), (op, name, shape)
        if name == "vqtriton" and ref is not None:
            assert r["ratio"] == 1.0


def test_report_mismatch_rates(report):
    _, rep = report
    for r in rep["rows"]:
        if r["op"] != "assign" or r["provider"].startswith("gemm"):
            assert r["mismatch"] is None, r
        else:
            assert 0.0 <= r["mismatch"] <= 1.0, r
        if r["op"] == "assign" and r["provider"].startswith("vqtriton"):
            # Every vqtriton mode is exact on the CPU's torch path; the bf16-inputs row is judged
            # against the argmin of the bf16 values it was given.
            assert r["mismatch"] == 0.0, r


def test_report_meta_and_table(report, capsys):
    _, rep = report
    meta = rep["meta"]
    assert meta["torch"] == torch.__version__ and meta["device"].startswith("cpu")
    assert "GPU numbers need a GPU" in meta["note"]
    text = bench.format_report(rep)
    assert "GPU numbers need a GPU" in text
    for op in bench.REPORT_OPS:
        assert f"\n{op} (" in text
    for s in SHAPES:
        assert bench.shape_id(s) in text
    for name in bench.PROVIDERS["assign"]:
        assert name in text


def test_report_png(report):
    out, _ = report
    png = (out / "report.png").read_bytes()
    assert png[:8] == PNG_MAGIC
    assert len(png) > 10_000


def test_report_provider_selection(tmp_path):
    rep = bench.run_report("cpu", [(50, 7, 2)], tmp_path, ["vqtriton", "assign/cdist"], warmup=0, reps=1)
    got = {(r["op"], r["provider"]) for r in rep["rows"]}
    assert got == {("assign", "vqtriton"), ("assign", "cdist"), ("quantize", "vqtriton"), ("layer", "vqtriton")}


# --- mismatch rate ------------------------------------------------------------------------------


def offset_data(n=1000, k=333, d=47, offset=100.0):
    # Data sharing a large offset: where the fp32 expanded form loses nearest codes.
    return torch.randn(n, d, dtype=torch.float64) + offset, torch.randn(k, d, dtype=torch.float64) + offset


def test_reference_indices_match_the_numpy_reference():
    z, c = offset_data()
    want = R.nearest_code(z.numpy(), c.numpy())
    np.testing.assert_array_equal(bench.reference_indices(z, c).numpy(), want)
    # Row chunks (7 rows at a time here) give the same answer.
    np.testing.assert_array_equal(bench.reference_indices(z, c, chunk_elems=7 * 333).numpy(), want)


def test_mismatch_rate_is_zero_for_exact_assign():
    z, c = offset_data()
    z, c = z.float(), c.float()
    assert bench.mismatch_rate(vqt.assign(z, c, backend="torch"), z, c) == 0.0


def test_mismatch_rate_counts_the_wrong_rows():
    z, c = offset_data(n=1000, k=50)
    ref = bench.reference_indices(z, c)
    wrong = ref.clone()
    wrong[::4] = (wrong[::4] + 1) % 50  # 250 of 1000 rows
    assert bench.mismatch_rate(wrong, z, c) == 0.25
    # Leading dims are flattened like the latents'.
    assert bench.mismatch_rate(wrong.reshape(10, 100), z.reshape(10, 100, 47), c) == 0.25


def test_mismatch_rate_sees_fp32_expanded_form_errors():
    z, c = offset_data(offset=1000.0)
    z, c = z.float(), c.float()
    assert bench.mismatch_rate(bench.eager_assign(z, c), z, c) > 0.1


def test_mismatch_rate_of_no_vectors():
    c = torch.randn(5, 3)
    assert bench.mismatch_rate(torch.empty(0, dtype=torch.int64), torch.empty(0, 3), c) == 0.0
