"""benchmarks/coglet_events.py runs: every event a stub predictor streams reaches its SSE client, one and several
streams at once, and the server's CPU time is read."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_streamed_event_arrives(tmp_path: Path) -> None:
    out = tmp_path / "events.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "coglet_events.py"), "--streams", "1", "3",
                    "--events", "300", "--out", str(out)], check=True, timeout=300, capture_output=True)
    rounds = json.loads(out.read_text())["rounds"]
    assert [r["streams"] for r in rounds] == [1, 3]
    for r in rounds:
        assert r["events"] == r["expected"] == r["streams"] * (300 // r["streams"])
        assert r["server_cpu_s"]["worker"] >= 0 and "orchestrator" in r["server_cpu_s"]
