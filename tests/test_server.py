"""The HTTP API: FastAPI's TestClient for the validation cases, and one real uvicorn start on loopback."""
from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

fastapi = pytest.importorskip("fastapi", reason="fastapi is not installed (only the server needs it)")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (FastAPI's TestClient needs it)")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from shared.records.checkpoint import load_for_sampling  # noqa: E402
from shared.interface.server import create_app  # noqa: E402
from tests.tiny_trained import NUM_CLASSES, SIZE, TIMESTEPS, one_thread, save_tiny_checkpoint  # noqa: E402,F401

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-ckpt"))


@pytest.fixture(scope="module")
def client(checkpoint):
    model, schedule, meta = load_for_sampling(checkpoint, "cpu")
    return TestClient(create_app(model, schedule, meta, torch.device("cpu")))


def _decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_health(client):
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["num_classes"] == NUM_CLASSES and body["num_timesteps"] == TIMESTEPS


def test_generate_returns_pngs_parameters_and_timing(client):
    r = client.post("/generate", json={"prompt": " Seven ", "guidance_scale": 2, "sampler": "ddim", "steps": 4,
                                       "seed": 5, "n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 2 and _decode(body["images"][0]).size == (SIZE, SIZE)
    assert body["parameters"]["label"] == 7 and body["parameters"]["seeds"] == [5, 6]
    assert body["parameters"]["steps"] == 4 and body["timing"]["images_per_s"] > 0
    # the same request gives the same pictures (per-sample seeds)
    again = client.post("/generate", json={"label": 7, "guidance_scale": 2, "sampler": "ddim", "steps": 4,
                                           "seed": 5, "n": 2}).json()
    assert again["images"] == body["images"]


@pytest.mark.parametrize("payload,needle", [
    ({"label": 1, "steps": 0}, "steps"), ({"label": 1, "steps": 1001}, "steps"),
    ({"label": 1, "steps": 500}, "steps must lie in [1, 100]"),
    ({"label": 1, "n": 0}, "n"), ({"label": 1, "n": 65}, "n"),
    ({"label": 1, "guidance_scale": -0.5}, "guidance_scale"), ({"label": 1, "guidance_scale": 20.5}, "guidance_scale"),
    ({"label": 10}, "label must lie in [0, 9]"), ({"label": -1}, "label"),
    ({"prompt": "eleven"}, "accepted"), ({"label": 1, "prompt": "one"}, "not both"),
    ({}, "give a label"), ({"label": 1, "sampler": "euler"}, "sampler"), ({"label": 1, "bogus": 1}, "bogus"),
    ({"label": "seven"}, "label"),
])
def test_bad_requests_are_422_with_a_message(client, payload, needle):
    r = client.post("/generate", json=payload)
    assert r.status_code == 422, r.text
    assert needle in r.text


def test_a_failing_request_does_not_take_the_server_down(checkpoint, monkeypatch):
    model, schedule, meta = load_for_sampling(checkpoint, "cpu")
    client = TestClient(create_app(model, schedule, meta, torch.device("cpu")))
    import shared.interface.server as server

    real_sample = server.sample
    monkeypatch.setattr(server, "sample", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory")))
    r = client.post("/generate", json={"label": 1, "steps": 2, "n": 1})
    assert r.status_code == 500 and "out of memory" in r.json()["detail"]
    monkeypatch.setattr(server, "sample", real_sample)
    assert client.post("/generate", json={"label": 1, "steps": 2, "n": 1}).status_code == 200
    assert client.get("/health").status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_py_under_uvicorn_on_loopback(checkpoint):
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "stage5_guidance" / "serve.py"), "--checkpoint",
                             str(checkpoint), "--port", str(port), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"serve.py exited early: {proc.stdout.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("serve.py did not answer /health in time")
            time.sleep(0.5)
        r = httpx.post(f"{url}/generate", json={"prompt": "three", "steps": 3, "n": 1}, timeout=60)
        assert r.status_code == 200 and len(r.json()["images"]) == 1
        assert httpx.post(f"{url}/generate", json={"label": 3, "n": 100}, timeout=10).status_code == 422
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
