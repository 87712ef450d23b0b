#!/usr/bin/env bash
# One full round of what only a GPU shows, for a machine with CUDA and the project installed
# (`pip install -e ".[dev]"`, or `python3 -m pip install --no-deps --no-build-isolation -e .`):
# the GPU-only tests, the cross-check, the comparison report and the pytest-benchmark suites.
# Usage: bash benchmarks/gpu_round.sh OUT_DIR   (logs, report.json/png and pytest-benchmark JSON)
# STEPS="gpu-tests certified" bash benchmarks/gpu_round.sh OUT_DIR runs only the steps named (of
# gpu-tests, certified, check, report, report-more, suites), to fit a round into calls of limited length.
set -uo pipefail
out="${1:?usage: bash benchmarks/gpu_round.sh OUT_DIR}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
status=0
steps="${STEPS:-gpu-tests certified check report report-more suites}"
run() {  # name, command...: log to OUT_DIR/name.log, remember a failure, go on
    local name="$1"; shift
    case " $steps " in *" $name "*) ;; *) echo "== $name: skipped (not in STEPS)"; return 0 ;; esac
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log" || status=1
}
"$py" -c "import torch, triton; print('card:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| triton', triton.__version__)" \
    | tee "$out/versions.log"
run gpu-tests "$py" -m pytest -q -p no:cacheprovider -m gpu tests
# How many rows the certified exact search leaves to the direct-form search on real tensor cores
# (0.5-3 % of N(0, 1) rows under the interpreter's emulation): the exact path's speed depends on it.
run certified "$py" - <<'PY'
import torch
from vqtriton.kernels.assign import _assign_certified
for n, k, d in [(32768, 1024, 256), (65536, 1024, 128), (65536, 16384, 8), (65536, 8192, 256), (262144, 4096, 64)]:
    for offset in (0.0, 100.0):
        z = torch.randn(n, d, device="cuda") + offset
        c = torch.randn(k, d, device="cuda") + offset
        idx = torch.empty(n, dtype=torch.int64, device="cuda")
        dist = torch.empty(n, device="cuda")
        listed = int(_assign_certified(z, c, idx, dist, None))
        print(f"N{n}-K{k}-D{d} offset {offset:g}: {listed} rows listed ({100 * listed / n:.2f} %)")
PY
run check "$py" -m vqtriton.cli check --device cuda
run report "$py" -m vqtriton.cli bench --device cuda --out "$out"
# The ops the default report leaves out: top-k, sampled codes, the fused residual encode, the RVQ and LFQ
# training steps, and the per-call overhead (host time per launch) at N = 1, 64, 1024.
run report-more "$py" -m vqtriton.cli bench --device cuda --ops topk,sample,residual,rvq,lfq,latency --out "$out/more"
run suites "$py" -m pytest -q -p no:cacheprovider benchmarks --benchmark-columns=median,iqr,rounds \
    --benchmark-sort=name --benchmark-json "$out/pytest-benchmark.json"
exit $status
