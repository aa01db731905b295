"""A real `stage5_guidance/serve.py` process on loopback for the HTTP and browser tests.

It listens on --port 0 (a free port chosen by the OS); the URL is read from its "serving … on http://…"
line, so two test modules never race for a port.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVE = REPO / "stage5_guidance" / "serve.py"
STARTUP_TIMEOUT_S = 300  # a loaded 2-core machine needs minutes to import torch and fastapi
_URL = re.compile(r"serving .* on (http://[0-9.]+:\d+) ")


@contextlib.contextmanager
def serve(checkpoint: Path, *extra: str):
    """Starts serve.py on 127.0.0.1:0, waits for /health, yields (url, output lines so far); stops it after."""
    import httpx

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(SERVE), "--checkpoint", str(checkpoint), "--port", "0",
                             "--device", "cpu", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        url = None
        while True:
            if proc.poll() is not None:
                reader.join(timeout=5)
                raise RuntimeError(f"serve.py exited early ({proc.returncode}): {''.join(lines)[-2000:]}")
            url = url or next((m.group(1) for line in list(lines) if (m := _URL.search(line))), None)
            if url:
                try:
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"serve.py did not answer /health in time: {''.join(lines)[-2000:]}")
            time.sleep(0.3)
        yield url, lines
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
