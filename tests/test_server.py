"""The HTTP API: FastAPI's TestClient for the validation cases, the limits and a table of malformed
requests, then one real serve.py under uvicorn on loopback for the same table over real connections."""
from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

fastapi = pytest.importorskip("fastapi", reason="fastapi is not installed (only the server needs it)")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (FastAPI's TestClient needs it)")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from shared.records.checkpoint import load_for_sampling  # noqa: E402
from shared.interface import server  # noqa: E402
from shared.interface.server import JobQueue, create_app  # noqa: E402
from tests.serve_process import REPO, SERVE, serve  # noqa: E402
from tests.tiny_trained import NUM_CLASSES, SIZE, TIMESTEPS, one_thread, save_tiny_checkpoint  # noqa: E402,F401



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
    ({}, "give a label"), ({"label": 1, "sampler": "lms"}, "sampler"), ({"label": 1, "bogus": 1}, "bogus"),
    ({"label": "seven"}, "label"),
])
def test_bad_requests_are_422_with_a_message(client, payload, needle):
    r = client.post("/generate", json=payload)
    assert r.status_code == 422, r.text
    assert needle in r.text
    body = r.json()  # every 422 names its field (or None for the request as a whole) and has one message
    assert set(body) == {"detail", "field", "message"} and isinstance(body["message"], str)


def test_a_failing_request_does_not_take_the_server_down(checkpoint, monkeypatch):
    model, schedule, meta = load_for_sampling(checkpoint, "cpu")
    client = TestClient(create_app(model, schedule, meta, torch.device("cpu")))
    real_sample = server.sample
    monkeypatch.setattr(server, "sample", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory")))
    r = client.post("/generate", json={"label": 1, "steps": 2, "n": 1})
    assert r.status_code == 500 and "out of memory" in r.json()["detail"]
    monkeypatch.setattr(server, "sample", lambda *a, **k: torch.full((1, 1, SIZE, SIZE), float("nan")))
    r = client.post("/generate", json={"label": 1, "steps": 2, "n": 1})
    assert r.status_code == 500 and "NaN or infinite" in r.json()["detail"]
    monkeypatch.setattr(server, "sample", real_sample)
    assert client.post("/generate", json={"label": 1, "steps": 2, "n": 1}).status_code == 200
    assert client.get("/health").status_code == 200




# --------------------------------------------------------------------------------------------------
# limits: body size, queue, work per request


def test_limits_endpoint_states_every_limit(client):
    limits = client.get("/limits").json()
    assert limits["max_steps"] == TIMESTEPS and limits["max_n"] == server.MAX_N
    assert limits["max_image_steps"] == server.MAX_IMAGE_STEPS and limits["max_body_bytes"] == server.MAX_BODY_BYTES
    assert limits["samplers"] == {"ddpm": TIMESTEPS, "ddim": 50, "dpmpp": 50, "euler": 50, "heun": 50}
    assert limits["inpaint_samplers"] == ["ddpm", "ddim"] and limits["image_shape"] == [1, SIZE, SIZE]
    assert limits["class_names"][7] == "seven" and len(limits["class_names"]) == NUM_CLASSES


def test_work_per_request_is_bounded(client, monkeypatch):
    monkeypatch.setattr(server, "MAX_IMAGE_STEPS", 10)
    r = client.post("/generate", json={"label": 1, "n": 4, "steps": 3})
    assert r.status_code == 422 and r.json()["field"] == "n" and "4 × 3 = 12 exceeds 10" in r.json()["message"]
    assert client.post("/generate", json={"label": 1, "n": 2, "steps": 5}).status_code == 200


def test_body_over_the_limit_is_413(client):
    big = {"label": 1, "prompt": "x" * server.MAX_BODY_BYTES}
    r = client.post("/generate", json=big)
    assert r.status_code == 413 and "request body over" in r.json()["message"]

    def chunks():  # no Content-Length: the running total decides
        yield b'{"label": 1, "prompt": "'
        for _ in range(server.MAX_BODY_BYTES // 1024 + 4):
            yield b"x" * 1024
        yield b'"}'

    r = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.post("/generate", json={"label": 1, "steps": 2, "n": 1}).status_code == 200


def test_full_queue_is_503_with_retry_after(checkpoint, monkeypatch):
    model, schedule, meta = load_for_sampling(checkpoint, "cpu")
    started, release, answers = threading.Event(), threading.Event(), []

    def slow(*args, **kwargs):
        started.set()
        release.wait(60)
        return torch.zeros(1, 1, SIZE, SIZE)

    monkeypatch.setattr(server, "sample", slow)
    client = TestClient(create_app(model, schedule, meta, torch.device("cpu"), queue=JobQueue(capacity=2, wait_s=0.5)))
    body = {"label": 1, "steps": 2, "n": 1}
    first = threading.Thread(target=lambda: answers.append(client.post("/generate", json=body)))
    first.start()
    assert started.wait(60)
    waited = client.post("/generate", json=body)  # second in line: waits 0.5 s for the model, then 503
    assert waited.status_code == 503 and waited.headers["retry-after"] == str(server.RETRY_AFTER_S)
    assert "busy" in waited.json()["message"]
    queue = JobQueue(capacity=1)
    with queue.slot():  # a full queue refuses at once
        with pytest.raises(server.Busy):
            with queue.slot():
                pass
    release.set()
    first.join(60)
    assert answers[0].status_code == 200


# --------------------------------------------------------------------------------------------------
# the trajectory and the page


def test_trajectory_frames_with_t_and_alpha_bar(client, checkpoint):
    _, schedule, _ = load_for_sampling(checkpoint, "cpu")
    body = client.post("/trajectory", json={"prompt": "three", "sampler": "ddim", "steps": 8, "seed": 4}).json()
    frames = body["frames"]
    assert len(frames) == 8 and [f["step"] for f in frames] == list(range(8))
    ts = [f["t"] for f in frames]
    assert ts == sorted(ts, reverse=True) and ts[0] == TIMESTEPS - 1
    for f in frames:
        assert f["alpha_bar"] == pytest.approx(float(schedule.alphas_cumprod[f["t"]]), rel=1e-12)
        assert _decode(f["x_t"]).size == _decode(f["x0"]).size == (SIZE, SIZE)
    # the final image is the /generate image of the same seed
    same = client.post("/generate", json={"label": 3, "sampler": "ddim", "steps": 8, "seed": 4, "n": 1}).json()
    assert body["final"] == same["images"][0] and body["parameters"]["label"] == 3
    long = client.post("/trajectory", json={"label": 3, "sampler": "ddpm"}).json()
    assert len(long["frames"]) == server.MAX_TRAJECTORY_FRAMES and long["timing"]["steps"] == TIMESTEPS
    assert client.post("/trajectory", json={"label": 3, "n": 2}).status_code == 422


def test_the_page_is_served_and_needs_nothing_from_outside(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/app.js">' in page.text and 'id="guidance"' in page.text
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    for path in server.STATIC_DIR.iterdir():  # offline: no CDN, no remote font, no absolute URL
        assert "://" not in path.read_text(), path.name


# --------------------------------------------------------------------------------------------------
# malformed requests: always 4xx, never 5xx, and the server answers a valid request afterwards

JSON = "application/json"
MALFORMED = [
    # non-finite and overflowing floats: Python's json reads NaN, Infinity and 1e309 (= inf)
    *[(b'{"label": 1, "%s": %s}' % (k.encode(), v), JSON) for k in ("guidance_scale", "eta")
      for v in (b"NaN", b"Infinity", b"-Infinity", b"1e309", b"-1e309")],
    (b'{"label": 1, "steps": NaN}', JSON), (b'{"label": 1, "steps": 1e309}', JSON), (b'{"label": 1, "n": NaN}', JSON),
    (b'{"label": 1, "seed": Infinity}', JSON), (b'{"label": NaN}', JSON), (b'{"label": 1e309}', JSON),
    # huge numbers
    (b'{"label": 1, "seed": ' + b"9" * 4000 + b"}", JSON), (b'{"label": 1, "seed": ' + b"9" * 5000 + b"}", JSON),
    (b'{"label": 1, "n": 100000000000000000000}', JSON), (b'{"label": 1, "steps": -99999999999999999999}', JSON),
    (b'{"label": 1, "guidance_scale": 1e308}', JSON), (b'{"label": 99999999999999999999999}', JSON),
    # wrong types
    (b'{"label": [1]}', JSON), (b'{"label": {"k": 1}}', JSON), (b'{"label": "seven"}', JSON),
    (b'{"label": 1, "n": "four"}', JSON), (b'{"label": 1, "n": 4.5}', JSON), (b'{"label": 1, "sampler": 5}', JSON),
    (b'{"label": 1, "clip_x0": "maybe"}', JSON), (b'{"prompt": 7}', JSON), (b'{"prompt": ["seven"]}', JSON),
    (b'{"label": 1, "guidance_scale": "3"}x', JSON), (b'{"label": 1, "eta": [0]}', JSON),
    # missing and unknown fields
    (b"{}", JSON), (b'{"n": 2}', JSON), (b'{"label": 1, "bogus": 1}', JSON), (b'{"Label": 1}', JSON),
    (b'{"label": 1, "__proto__": {}}', JSON),
    # out of range
    (b'{"label": 1, "n": 65}', JSON), (b'{"label": 1, "steps": 0}', JSON), (b'{"label": 99}', JSON),
    (b'{"label": -1}', JSON), (b'{"label": 1, "seed": -1}', JSON), (b'{"label": 1, "guidance_scale": -0.001}', JSON),
    (b'{"prompt": "' + b"x" * 101 + b'"}', JSON), (b'{"prompt": "eleven"}', JSON),
    # not JSON, or not an object
    (b"", JSON), (b"not json", JSON), (b'{"label": 1', JSON), (b"[1, 2, 3]", JSON), (b'"seven"', JSON),
    (b"null", JSON), (b"7", JSON), (b"\xff\xfe\x00\x01", JSON), (b'{"label": 1}{"label": 2}', JSON),
    (b"{'label': 1}", JSON), (b"[" * 4000 + b"]" * 4000, JSON), (b"label=1", "application/x-www-form-urlencoded"),
    (b"\x00" * 100, "application/octet-stream"),
    # oversize
    (b'{"label": 1, "prompt": "' + b"x" * 20_000 + b'"}', JSON),
    (b" " * (server.MAX_BODY_BYTES + 1_000) + b'{"label": 1}', JSON),
    (b'{"label": 1, "inpaint_image": "' + b"A" * (server.MAX_BODY_BYTES + 8) + b'"}', JSON),
    # the guidance refinements and the inpainting fields
    (b'{"label": 1, "guidance_rescale": NaN}', JSON), (b'{"label": 1, "guidance_rescale": 1.5}', JSON),
    (b'{"label": 1, "guidance_interval": [1]}', JSON), (b'{"label": 1, "guidance_interval": [0, Infinity]}', JSON),
    (b'{"label": 1, "guidance_interval": [-1, 2]}', JSON), (b'{"label": 1, "guidance_interval": "0,2"}', JSON),
    (b'{"label": 1, "inpaint_image": 7, "inpaint_mask": 7}', JSON), (b'{"label": 1, "inpaint_mask": "AAAA"}', JSON),
    (b'{"label": 1, "inpaint_image": "%%%", "inpaint_mask": "%%%"}', JSON), (b'{"label": 1, "resamplings": 0}', JSON),
    (b'{"label": 1, "jump_length": 1e309}', JSON),
]


def _check_malformed(post) -> dict:
    counts = {"malformed": 0, "4xx": 0, "5xx": 0}
    for body, kind in MALFORMED:
        r = post(body, kind)
        counts["malformed"] += 1
        counts["4xx"] += 400 <= r.status_code < 500
        counts["5xx"] += r.status_code >= 500
        assert 400 <= r.status_code < 500, (body[:80], r.status_code, r.text[:300])
        if r.status_code == 422:
            assert json.loads(r.text)["message"]  # a JSON-safe body with a message
    return counts


def test_malformed_requests_through_the_test_client(client):
    counts = _check_malformed(lambda body, kind: client.post("/generate", content=body, headers={"content-type": kind}))
    assert counts == {"malformed": len(MALFORMED), "4xx": len(MALFORMED), "5xx": 0}
    assert client.post("/generate", json={"label": 2, "steps": 2, "n": 1}).status_code == 200


def test_serve_py_under_uvicorn_on_loopback(checkpoint):
    """A real serve.py: a valid request, the malformed table over one keep-alive client (a NaN must not
    reset the connection), then valid requests still answered."""
    with serve(checkpoint) as (url, _):
        with httpx.Client(base_url=url, timeout=60) as http:
            r = http.post("/generate", json={"prompt": "three", "steps": 3, "n": 1})
            assert r.status_code == 200 and len(r.json()["images"]) == 1
            for value in (b"NaN", b"Infinity", b"1e309"):
                bad = http.post("/generate", content=b'{"label": 1, "guidance_scale": %s}' % value,
                                headers={"content-type": JSON})
                assert bad.status_code == 422 and bad.json()["field"] == "guidance_scale"
                assert http.get("/health").status_code == 200  # the same connection still answers
            counts = _check_malformed(lambda body, kind: http.post("/generate", content=body,
                                                                   headers={"content-type": kind}))
            assert counts["5xx"] == 0 and counts["4xx"] == len(MALFORMED)
            assert http.post("/generate", json={"label": 3, "steps": 2, "n": 2}).status_code == 200
            assert http.get("/").status_code == 200


# --------------------------------------------------------------------------------------------------
# serve.py start-up: one line for each failure, before serving


def _serve_main(argv, capsys) -> list[str]:
    from shared import flags

    sys.path.insert(0, str(SERVE.parent))
    try:
        import importlib.util

        spec = importlib.util.spec_from_file_location("serve_under_test", SERVE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SERVE.parent))
    with pytest.raises(SystemExit) as exit_info:
        flags.run_main(module.main, argv)
    assert exit_info.value.code == 2
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_serve_py_port_in_use_and_bad_host_are_one_line(checkpoint, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        lines = _serve_main(["--checkpoint", str(checkpoint), "--port", str(port), "--device", "cpu"], capsys)
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot listen on 127.0.0.1:{port}"), lines
    lines = _serve_main(["--checkpoint", str(checkpoint), "--host", "no-such-host.invalid", "--device", "cpu"], capsys)
    assert len(lines) == 1 and "--host 'no-such-host.invalid' cannot be resolved" in lines[0], lines


def test_serve_py_fused_kernels_that_cannot_run_stop_at_start_up(checkpoint, capsys, monkeypatch):
    def no_driver(*args, **kwargs):
        raise RuntimeError("0 active drivers ([]). There should only be one.")

    monkeypatch.setattr(server, "sample", no_driver)
    lines = _serve_main(["--checkpoint", str(checkpoint), "--port", "0", "--device", "cpu", "--fused-kernels"], capsys)
    assert len(lines) == 1 and lines[0].startswith("error: --fused-kernels cannot run here: RuntimeError: 0 active"), lines


def test_serve_py_bad_port_flag_is_one_line():
    r = subprocess.run([sys.executable, str(SERVE), "--checkpoint", "x", "--port", "70000"], capture_output=True,
                       text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--port" in r.stderr


# --------------------------------------------------------------------------------------------------
# Euler / Heun, the guidance refinements and inpainting over the API


def _png(pixels) -> str:
    """base64 PNG of a uint8 array [H x W] (grey)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _inpaint_pair(fill_rows=slice(8, None)):
    """(source uint8 [H x W]: a class-1 bar image, mask uint8 with 255 on the rows to fill)."""
    from shared.records.images import to_uint8
    from tests.tiny_trained import bar_patterns

    images, _ = bar_patterns(10, seed=4)
    source = to_uint8(images[1, 0]).numpy()
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[fill_rows] = 255
    return source, mask


def test_heun_reports_its_nfe_and_the_guidance_refinements_change_the_images(client):
    base = {"label": 4, "guidance_scale": 4, "sampler": "heun", "steps": 4, "seed": 2, "n": 1}
    plain = client.post("/generate", json=base).json()
    assert plain["parameters"]["nfe"] == 7 and plain["parameters"]["inpaint"] is None
    rescaled = client.post("/generate", json={**base, "guidance_rescale": 0.7}).json()
    interval = client.post("/generate", json={**base, "guidance_interval": [0.5, 3.0]}).json()
    assert rescaled["parameters"]["guidance_rescale"] == 0.7 and interval["parameters"]["guidance_interval"] == [0.5, 3.0]
    assert len({plain["images"][0], rescaled["images"][0], interval["images"][0]}) == 3
    wide = client.post("/generate", json={**base, "guidance_interval": [0.0, 1e6]}).json()  # every level: plain CFG
    assert wide["images"] == plain["images"]


def test_trajectory_of_a_karras_sampler_has_fractional_t(client, checkpoint):
    from shared.diffusion.schedule import alpha_bar_at

    _, schedule, _ = load_for_sampling(checkpoint, "cpu")
    frames = client.post("/trajectory", json={"label": 2, "sampler": "euler", "steps": 6}).json()["frames"]
    ts = [f["t"] for f in frames]
    assert len(ts) == 6 and ts == sorted(ts, reverse=True) and ts[0] == TIMESTEPS - 1
    assert any(t != round(t) for t in ts)
    for f in frames:
        assert f["alpha_bar"] == pytest.approx(alpha_bar_at(schedule, float(f["t"])), rel=1e-4)


def test_inpainting_over_the_api_keeps_the_source_pixels(client):
    source, mask = _inpaint_pair()
    body = {"label": 3, "guidance_scale": 3, "sampler": "ddim", "steps": 10, "seed": 1, "n": 2,
            "inpaint_image": _png(source), "inpaint_mask": "data:image/png;base64," + _png(mask),
            "jump_length": 2, "resamplings": 2}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    params = r.json()["parameters"]
    assert params["inpaint"] == {"jump_length": 2, "resamplings": 2, "filled_pixels": 8 * SIZE}
    assert params["nfe"] == 18  # RePaint's down moves: 10, + (r − 1)·j = 2 at each of 4 jump points (t = 0, 2, 4, 6)
    keep = mask == 0
    for image in r.json()["images"]:
        pixels = np.asarray(_decode(image).convert("L"))
        assert np.array_equal(pixels[keep], source[keep])
        assert not np.array_equal(pixels[~keep], source[~keep])  # the filled rows were drawn anew


@pytest.mark.parametrize("change, field, needle", [
    (dict(inpaint_mask=None), "inpaint_mask", "needs both"),
    (dict(inpaint_image=base64.b64encode(b"not an image").decode()), "inpaint_image", "not an image"),
    (dict(inpaint_image="@@@"), "inpaint_image", "base64"),
    (dict(inpaint_mask=_png(np.full((8, 8), 255, dtype=np.uint8))), "inpaint_mask", "8×8"),
    (dict(inpaint_image=_png(np.zeros((SIZE + 1, SIZE), dtype=np.uint8))), "inpaint_image", f"{SIZE}×{SIZE + 1}"),
    (dict(inpaint_mask=_png(np.full((SIZE, SIZE), 128, dtype=np.uint8))), "inpaint_mask", "binary"),
    (dict(sampler="dpmpp"), "sampler", "inpainting runs on"),
    (dict(sampler="heun"), "sampler", "inpainting runs on"),
])
def test_bad_inpainting_inputs_are_422_naming_the_field(client, change, field, needle):
    source, mask = _inpaint_pair()
    body = {"label": 3, "sampler": "ddim", "steps": 4, "n": 1, "inpaint_image": _png(source),
            "inpaint_mask": _png(mask), **change}
    r = client.post("/generate", json={k: v for k, v in body.items() if v is not None})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and needle in r.json()["message"], r.json()


def test_inpainting_work_counts_its_resampling(client, monkeypatch):
    source, mask = _inpaint_pair()
    monkeypatch.setattr(server, "MAX_IMAGE_STEPS", 100)
    body = {"label": 3, "sampler": "ddim", "steps": 20, "n": 2, "inpaint_image": _png(source),
            "inpaint_mask": _png(mask), "jump_length": 5, "resamplings": 3}
    r = client.post("/generate", json=body)  # 20 steps, 3 jump points × 2 × 5 more: 50 NFE, × 2 images = 100
    assert r.status_code == 200 and r.json()["parameters"]["nfe"] == 50, r.text
    body["n"] = 3
    r = client.post("/generate", json=body)
    assert r.status_code == 422 and "n × NFE = 3 × 50 = 150 exceeds 100" in r.json()["message"]
