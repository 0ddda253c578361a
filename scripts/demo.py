"""One real prediction, end to end, through the same Cog HTTP server (coglet) the image runs.

    python3 scripts/demo.py [--image PATH] [--prompt TEXT] [--max-tokens N] [--download]

1. Creates `.venv` from requirements-test.txt if needed, and re-runs itself there.
2. Picks the model: DeepSeek-VL2-small on the GPU when there is a GPU and a checkpoint (in
   `weights/`, or where DSVL2_WEIGHTS points; `--download` fetches the official one first).
   Otherwise it builds a tiny checkpoint with RANDOM weights in `demo-weights/` and says so: its
   answer is gibberish, but every step of serving is the real one.
3. Starts `python -m cog.server.http` on 127.0.0.1, waits for READY, sends one streaming (SSE)
   prediction with an image, prints the text as it arrives and the metrics, and stops the server.
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
DEMO_WEIGHTS = ROOT / "demo-weights"


def ensure_venv() -> None:
    """Re-run this script with the project's virtual environment, creating it if needed."""
    if Path(sys.prefix).resolve() == (ROOT / ".venv").resolve():
        return
    if not VENV_PYTHON.exists():
        print("demo: creating .venv (first run only) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(ROOT / ".venv")], check=True)
    print("demo: installing requirements-test.txt into .venv ...", flush=True)
    subprocess.run([str(VENV_PYTHON), "-m", "pip", "install", "--quiet", "-r",
                    str(ROOT / "requirements-test.txt")], check=True)
    os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), *sys.argv])


def choose_model(download: bool) -> tuple[Path, str, bool]:
    """(checkpoint, device, is_demo_checkpoint)."""
    import torch

    weights = Path(os.environ.get("DSVL2_WEIGHTS", ROOT / "weights"))
    has_gpu = torch.cuda.is_available()
    if has_gpu and download and not (weights / "config.json").is_file():
        from dsvl2.startup.download import ensure_checkpoint

        ensure_checkpoint(weights, log=lambda m: print(m, flush=True))
    if has_gpu and (weights / "config.json").is_file():
        print(f"demo: DeepSeek-VL2-small from {weights} on the GPU", flush=True)
        return weights, "cuda", False
    why = "no GPU" if not has_gpu else f"no checkpoint in {weights} (use --download to fetch it)"
    banner = "#" * 100
    print(f"{banner}\n# DEMONSTRATION CHECKPOINT ({why}): a tiny model with RANDOM weights.\n"
          f"# Its answer is meaningless text; everything else (processor, engine, server, streaming,\n"
          f"# metrics) is the real code path.\n{banner}", flush=True)
    if not (DEMO_WEIGHTS / "config.json").is_file():
        from dsvl2.model.tiny import build_random_checkpoint

        build_random_checkpoint(DEMO_WEIGHTS, preset="demo", seed=0)
        print(f"demo: wrote the random demonstration checkpoint to {DEMO_WEIGHTS}", flush=True)
    return DEMO_WEIGHTS, "cuda" if has_gpu else "cpu", True


def sample_image(directory: Path) -> Path:
    """A simple synthetic picture: a red disc and a blue square on a pale background."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (640, 480), (235, 240, 245))
    draw = ImageDraw.Draw(image)
    draw.ellipse((80, 120, 300, 340), fill=(210, 40, 40))
    draw.rectangle((360, 140, 560, 340), fill=(40, 70, 200))
    path = directory / "demo.png"
    image.save(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, device: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(
        os.environ,
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        COG_PREDICT_TYPE_STUB="predict.py:Runner",
        PORT=str(port),
        DSVL2_WEIGHTS=str(checkpoint),
        DSVL2_DEVICE=device,
    )
    print(f"demo: starting the Cog server on 127.0.0.1:{port} (log: {log_path})", flush=True)
    process = subprocess.Popen([sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"], cwd=ROOT,
                               env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


def wait_ready(process: subprocess.Popen, url: str, timeout_s: float = 1800) -> dict:
    import requests

    last, deadline = None, time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            health = requests.get(f"{url}/health-check", timeout=10).json()
        except requests.ConnectionError:
            time.sleep(0.2)
            continue
        if health["status"] != last:
            last = health["status"]
            print(f"demo: health-check {last}", flush=True)
        if last != "STARTING":
            return health
        time.sleep(0.2)
    raise SystemExit("demo: the server did not finish setup")


def stream_prediction(url: str, inputs: dict) -> dict:
    """POST with Accept: text/event-stream; print output chunks as they come; return the final state."""
    import json

    import requests

    final, event = {}, None
    with requests.post(f"{url}/predictions", json={"input": inputs}, stream=True, timeout=3600,
                       headers={"Accept": "text/event-stream"}) as response:
        response.raise_for_status()
        for raw in response.iter_lines():
            line = raw.decode("utf-8")  # SSE is always UTF-8
            if line.startswith("event:"):
                event = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                data = json.loads(line.removeprefix("data:"))
                if event == "output":
                    print(data["chunk"], end="", flush=True)
                elif event == "completed":
                    final = data
    print(flush=True)
    return final


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--image", type=Path, help="image file (default: a generated picture)")
    parser.add_argument("--prompt", default="Describe this image.")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_length_tokens (default 64)")
    parser.add_argument("--download", action="store_true",
                        help="on a GPU machine without a checkpoint, download the official one (~32 GB)")
    args = parser.parse_args()
    ensure_venv()
    sys.path.insert(0, str(ROOT))  # the dsvl2 package

    import base64
    import json
    import mimetypes

    checkpoint, device, is_demo = choose_model(args.download)
    with tempfile.TemporaryDirectory() as tmp:
        image = args.image or sample_image(Path(tmp))
        process, url = start_server(checkpoint, device, Path(tmp) / "server.log")
        try:
            health = wait_ready(process, url)
            if health["status"] != "READY":
                print(health.get("setup", {}).get("logs", ""))
                print(f"demo: setup failed ({health['status']})")
                return 1
            mime = mimetypes.guess_type(image.name)[0] or "application/octet-stream"
            data_uri = f"data:{mime};base64,{base64.b64encode(image.read_bytes()).decode()}"
            inputs = {"image": data_uri, "prompt": args.prompt, "max_length_tokens": args.max_tokens}
            print(f"demo: POST /predictions (SSE) image={image.name} prompt={args.prompt!r}\n--- output ---",
                  flush=True)
            final = stream_prediction(url, inputs)
            print(f"--- {final.get('status')} ---")
            if final.get("error"):
                print(f"error: {final['error']}")
            print(f"metrics: {json.dumps(final.get('metrics', {}), indent=2)}")
            if is_demo:
                print("demo: (that text came from the RANDOM-weight demonstration checkpoint, not the real model)")
            return 0 if final.get("status") == "succeeded" else 1
        finally:
            process.terminate()
            process.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
