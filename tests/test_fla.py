"""fla-core's Triton kernels for the gated delta rule (the GPU prefill path, ops.gated_delta.gated_delta_fla)
against our reference, run on the CPU by Triton's interpreter in a subprocess (fla_interpret.py says how):
the argument mapping (layouts, scale, no in-kernel norm, state layout) is what this checks; the GPU run of
the same comparison is in test_cuda.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_fla_kernels_match_our_rule_under_the_triton_interpreter():
    here = Path(__file__).parent
    run = subprocess.run([sys.executable, str(here / "fla_interpret.py")], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "QWEN36_FLA": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    cases = result["cases"]
    assert len(cases) == 5 and {c["recurrent"] for c in cases} == {False, True}
    for c in cases:
        assert c["shape_ok"] and c["state_kept"], c
        assert max(c["o"], c["state"], c["vs_chunked"]) < 1e-5, c
