"""Every kernel variant compiles for an H100 (sm_90) with the installed Triton, without a GPU.

The interpreter runs the kernels' arithmetic but never compiles them, so a kernel that does not
lower for the real target would pass every other test here and fail at its first launch on a GPU.
``benchmarks/resources.py`` compiles every variant the launchers request (each autotune config,
dtype, precision mode, code path) with Triton's compiler and the ptxas it ships, and reads each
cubin's registers, spills and shared memory. It runs in a subprocess: this process runs the
interpreter, and the compiler must not.
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {"_assign_kernel", "_centre_kernel", "_codebook_scan_kernel", "_codebook_parts_kernel", "_gather_kernel",
           "_scatter_add_kernel", "_segment_sum_kernel", "_sqerr_fwd_kernel", "_sum_partials_kernel",
           "_sqerr_bwd_kernel", "_quantize_bwd_kernel", "_topk_kernel", "_sample_kernel",
           "_lfq_halves_kernel", "_lfq_halves_bwd_kernel", "_entropy_kernel", "_residual_kernel", "_replay_kernel"}


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_sm90(tmp_path):
    out = tmp_path / "sm90.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "resources.py"), "--arch", "90", "--json", str(out),
           "--sass", "--workers", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3000)
    log = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert out.exists(), log
    report = json.loads(out.read_text())
    variants = report["variants"]
    failed = [(v["signature"], v["error"]) for v in variants if v["error"]]
    assert not failed, f"{len(failed)} variants do not compile for sm_90: {failed[:3]}"
    too_big = [v["signature"] for v in variants if v["shared_bytes"] > report["smem_limit"]]
    assert not too_big, f"over the shared-memory limit of one program: {too_big[:3]}"
    assert {v["kernel"].rsplit(".", 1)[-1] for v in variants} == KERNELS
    # The tensor-core searches really use Hopper's matrix instructions (wgmma: HGMMA in SASS).
    for mode in ("MODE=1", "MODE=2", "MODE=3"):
        dots = [v for v in variants if f" {mode} " in f" {v['signature']} " and "SEARCH=1" in v["signature"]]
        assert dots and all(v["tensor_core_ops"] > 0 for v in dots), f"{mode}: no HGMMA in {dots[:1]}"
    assert proc.returncode == 0, log
    spilled = [f"{v['kernel']} {v['signature']}: {v['local_bytes']} B" for v in variants if v["local_bytes"]]
    if spilled:
        # A performance defect (retune the configs), not a wrong result.
        warnings.warn(f"{len(spilled)} variants spill registers on sm_90 with triton {report['triton']}: "
                      f"{spilled[:3]}")
