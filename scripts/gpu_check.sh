#!/usr/bin/env bash
# The GPU checks in one run, under 10 minutes on one H200 (the limits below add up to 9.5 minutes at worst,
# ~5 expected):
#   1. the CUDA tests (tests/test_cuda.py: parity with transformers in fp32, bf16 drift against transformers'
#      own, grouped experts, fla kernels, CUDA graphs == uncaptured == eager, --cpu-experts == all on the GPU)
#      (the device-agnostic ones, tests/test_gpu_path.py, run in the CPU suite);
#   2. `qwen36 device-bench` at the real geometry with random weights made on the GPU: batch-1 decode against
#      the HBM roofline, 16 and 64 concurrent, an 8K prefill, and the experts on the CPU (--cpu-experts all).
# Writes $OUT/gpu_check.json (the bench's JSON plus the test counts) and beside it pytest.log, junit.xml,
# bench.log, bench.json (5 files: the device tool returns at most 8); the rest goes to stdout.
# Before the run, here: bash scripts/gpu_wheels.sh (packages the machine lacks, carried as .whl/).
# GPU_CHECK_DRY=1 runs the same steps on this CPU (test_cuda's logic on the CPU, the bench at a tiny geometry).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 QWEN36_CACHE=${QWEN36_CACHE:-/tmp/qwen36-cache} HF_HUB_OFFLINE=1
if [ -z "${GPU_CHECK_DRY:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl >/tmp/gpu-check-pip.log 2>&1 || { echo "wheel install failed"; tail /tmp/gpu-check-pip.log; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
[ -n "${GPU_CHECK_DRY:-}" ] && export QWEN36_TEST_DEVICE=cpu      # test_cuda's logic on the CPU
start=$(date +%s)
nvidia-smi -L 2>&1
python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())" 2>&1

# the CPU kernels (for the offload part) compile in the background while the GPU works
python3 -c "from qwen36.ops import native; print(native.load() is not None, native.load512() is not None)" \
    >/tmp/gpu-check-kernels.log 2>&1 &
kernels_pid=$!

# (test_gpu_path.py is the CPU suite's; here only the CUDA tests.) SIGINT at the limit: pytest still writes
# its junit file. The first fla calls compile and autotune Triton kernels (tens of seconds per shape).
timeout -s INT -k 15 230 python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py \
    --junitxml "$OUT/junit.xml" >"$OUT/pytest.log" 2>&1
echo "pytest rc $? after $(( $(date +%s) - start )) s"; tail -25 "$OUT/pytest.log"
timeout 60 tail --pid=$kernels_pid -f /dev/null; cat /tmp/gpu-check-kernels.log

if [ -n "${GPU_CHECK_DRY:-}" ]; then
    bench=(--device cpu --dtype float32 --dry-run)
else
    bench=(--device cuda --dtype bfloat16)
fi
timeout -k 10 240 python3 -m qwen36.cli device-bench "${bench[@]}" --out "$OUT/bench.json" >"$OUT/bench.log" 2>&1
echo "bench rc $? after $(( $(date +%s) - start )) s"; grep '^{"' "$OUT/bench.log"

python3 - "$OUT" <<'PY'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
out = Path(sys.argv[1])
res = {}
try:
    res = json.loads((out / "bench.json").read_text())
except Exception as e:  # noqa: BLE001
    res["bench_error"] = repr(e)
try:
    suite = ET.parse(out / "junit.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    res["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    res["tests"]["failed"] = [c.get("name") for c in suite.iter("testcase")
                              if c.find("failure") is not None or c.find("error") is not None]
except Exception as e:  # noqa: BLE001
    res["tests_error"] = repr(e)
(out / "gpu_check.json").write_text(json.dumps(res, indent=1) + "\n")
print(json.dumps({k: v for k, v in res.items() if k in ("tests", "roofline_tok_s", "decode_b1")}))
PY
echo "done in $(( $(date +%s) - start )) s"
