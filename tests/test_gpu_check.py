"""tools/gpu_check.sh --cpu: the GPU check's own code on the tiny model on CPU, as a user runs it (bash, a fresh
process): every figure of the JSON is there and the closed forms hold (step-0 losses with policy = reference,
packed = padded on the device, no padding in the packed layout)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from helpers import REPO


def test_gpu_check_cpu_mode_writes_every_figure(tmp_path):
    out = tmp_path / "figures" / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", "tools/gpu_check.sh", "--cpu", "--out", str(out)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["mode"] == "cpu" and figures["device"] == "cpu"
    runs = {(r["loss"], r["layout"]): r for r in figures["runs"]}
    assert set(runs) == {("dpo", "packed"), ("nca", "packed"), ("dpo", "padded")}
    for run in runs.values():
        assert run["tokens_per_s"] > 0 and 0 < run["mfu"] < 1 and run["plan_gib"] > 0 and run["steps"] == 1
    # step 0: policy = reference, every log-ratio 0: DPO = ln 2, NCA = -log sig(0) - mean_k log sig(0) = 2 ln 2
    assert math.isclose(runs[("dpo", "packed")]["loss_first"], math.log(2), abs_tol=1e-6)
    assert math.isclose(runs[("nca", "packed")]["loss_first"], 2 * math.log(2), abs_tol=1e-6)
    assert runs[("dpo", "packed")]["padding_fraction"] == 0 < runs[("dpo", "padded")]["padding_fraction"]
    exact = figures["exactness"]
    assert exact["attention_path"] == "sdpa" and exact["max_abs_token_logp_diff"] < 1e-5
    assert exact["max_rel_grad_diff"] < 1e-4
    assert figures["trl"]["tokens_per_s"] > 0 and figures["trl"]["padding_fraction"] > 0
    assert "dpo_packed_vs_trl" in figures["ratios"]
    assert figures["precision"]["exit_code"] == 0 and figures["precision"]["ok"]  # issue 11's checks, folded in
    assert set(figures["targets"]) == {"dpo_mfu >= 0.40", "peak within 15% of plan", "ours >= 2x TRL"}
