"""The ``vqtriton`` command: each verb with tiny settings."""

import json
import subprocess
import sys

import pytest
import torch

import vqtriton
from vqtriton import check, checkpoint, cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_MAGIC and len(data) > 5000, f"{path} is not a real PNG ({len(data)} bytes)"


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "vqtriton.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and all(verb in out.stdout for verb in ("check", "bench", "demo"))


@pytest.fixture
def small_shapes(monkeypatch):
    monkeypatch.setitem(check.SHAPES, "cpu", [(97, 13, 7), (1, 1, 1)])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_check_passes_and_prints_the_table(capsys, small_shapes, backend):
    assert cli.main(["check", "--device", "cpu", "--backend", backend]) == 0
    out = capsys.readouterr().out
    for op in check.CHECKS:
        assert op in out
    assert "max error" in out and "index agreement" in out and "FAIL" not in out
    assert f"{2 * len(check.CHECKS)} passed, 0 failed" in out


def test_check_fails_on_a_disagreement(capsys, small_shapes, monkeypatch):
    real_assign = vqtriton.assign

    def off_by_one(z, codebook, *args, **kw):
        out = real_assign(z, codebook, *args, **kw)
        if isinstance(out, tuple):
            return ((out[0] + 1) % codebook.shape[0], out[1])
        return (out + 1) % codebook.shape[0]

    monkeypatch.setattr(vqtriton, "assign", off_by_one)
    assert cli.main(["check", "--device", "cpu", "--backend", "torch"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "assign" in out


def test_bench_writes_json_and_png(tmp_path, capsys):
    assert cli.main(["bench", "--device", "cpu", "--shapes", "300x40x8", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report  # the report's own structure is tested in test_bench_report.py
    assert "GPU" in capsys.readouterr().out  # says plainly that GPU numbers need a GPU
    assert_png(tmp_path / "report.png")


def test_bench_providers_and_reps(tmp_path):
    args = ["bench", "--device", "cpu", "--shapes", "200x20x4", "--providers", "layer/vqtriton,layer/vqtriton-compat",
            "--reps", "2", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert {(r["op"], r["provider"]) for r in report["rows"]} == {("layer", "vqtriton"), ("layer", "vqtriton-compat")}
    assert report["meta"]["reps"] == 2


def test_demo_trains_saves_and_resumes(tmp_path, capsys):
    args = ["demo", "--steps", "40", "--codes", "16", "--device", "cpu", "--backend", "torch", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "reconstruction error" in out and "perplexity" in out and "usage" in out
    assert_png(tmp_path / "reconstructions.png")
    assert_png(tmp_path / "training.png")
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert state["step"] == 40
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 40  # a plain torch file too
    rec = state["history"]["reconstruction"]
    assert rec[-1] < 0.7 * rec[0], f"the loss did not fall: {rec[0]:.4f} -> {rec[-1]:.4f}"
    assert not checkpoint.stale_temp_files(tmp_path / "checkpoint.pt"), "the checkpoint's temp file was left behind"

    # --resume continues from the saved step, exactly: the history is the one of a 60-step run
    # (every 10th step and the last), and tests/test_resume.py checks the weights bit for bit.
    args[2] = "60"
    assert cli.main([*args, "--resume"]) == 0
    assert f"resumed from step 40 of {tmp_path / 'checkpoint.pt'}" in capsys.readouterr().out
    resumed = checkpoint.load(tmp_path / "checkpoint.pt")
    assert resumed["step"] == 60
    assert resumed["history"]["step"] == [0, 10, 20, 30, 40, 50, 59]
    assert resumed["history"]["reconstruction"][:4] == state["history"]["reconstruction"][:4]


def test_demo_resume_without_a_checkpoint_says_it_starts_at_step_0(tmp_path, capsys):
    args = ["demo", "--steps", "3", "--codes", "4", "--batch", "5", "--backend", "torch", "--out", str(tmp_path)]
    assert cli.main([*args, "--resume"]) == 0
    assert f"no checkpoint at {tmp_path / 'checkpoint.pt'}: started at step 0" in capsys.readouterr().out
    assert checkpoint.load(tmp_path / "checkpoint.pt")["step"] == 3


def test_demo_ema_mode(tmp_path, capsys):
    args = ["demo", "--steps", "20", "--codes", "8", "--ema", "--backend", "torch", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    assert "perplexity" in capsys.readouterr().out
