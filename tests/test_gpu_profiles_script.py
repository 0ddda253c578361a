"""benchmarks/gpu_profiles.py on the CPU: one emulated profile in its own process, with the outlier weights, collated
into one JSON and a table (on the GPU the same script measures issue 13's profiles)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_profiles_script_runs_a_profile_and_the_outlier_check_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "out" / "gpu_profiles.json"
    done = subprocess.run([sys.executable, "benchmarks/gpu_profiles.py", "--preset", "demo", "--device", "cpu",
                           "--workdir", str(tmp_path), "--out", str(out), "--profiles", "l40s", "--outliers",
                           "--tokens", "16", "--decode-tokens", "8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["outliers_in"] == "l40s"
    run = res["profiles"]["l40s"]
    assert run["emulated"] == "l40s" and run["kernels"]["slots"] == 1  # the child saw DSVL2_EMULATE_GPU
    assert run["decode_tok_s_greedy"] > 0 and run["ttft_ms"] > 0
    for check in (run["exactness"], run["outliers"]):
        assert check["greedy_ids_equal"] == "16/16"
        assert check["logits_rel_l2"] < 1e-5  # float32 on the CPU: the paths differ only in summation order
        assert sum(v for k, v in check.items() if "nonfinite" in k) == 0
    assert run["outliers"]["sampled_ids_equal"] == "16/16"
    assert run["outliers"]["logits_abs_max"] > 20 * run["exactness"]["logits_abs_max"]  # the scaled lm_head
    assert (tmp_path / "out" / "gpu_profiles-l40s.log").exists()
    table = done.stdout.splitlines()
    assert any(line.startswith("l40s+outliers") and " ok " in line for line in table), done.stdout[-2000:]
