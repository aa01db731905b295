"""The HTTP API of stage 5: a FastAPI app that samples from one model loaded at start-up, and a web page
over that API.

    GET  /             the web page (shared/interface/static/: plain HTML, CSS and JavaScript, offline)
    GET  /health       → {"status": "ok", "num_classes", "image_shape", "num_timesteps", "device", "dataset"}
    GET  /limits       → every limit below, the samplers with their default steps, the class names
    POST /generate     {"label": 7 | "prompt": "seven", "guidance_scale": 3, "sampler": "ddim", "steps": 50,
                        "seed": 0, "n": 4, "eta": 0, "clip_x0": true, "guidance_rescale": 0,
                        "guidance_interval": [lo, hi] | null, "inpaint_image": base64 PNG | null,
                        "inpaint_mask": base64 PNG | null, "jump_length": 10, "resamplings": 10}
        → {"images": [base64 PNG, …], "parameters": {resolved request}, "timing": {"seconds", "images_per_s"}}
    POST /trajectory   the same fields without n: one sample (the seed's), recorded at every network call
        → {"frames": [{"step", "t", "alpha_bar", "x_t", "x0"}, …], "final", "parameters", "timing"}

Inpainting (RePaint, samplers ddpm and ddim): inpaint_image is the source (the model's size and
channels), inpaint_mask a grey image with 255 (white) where to draw and 0 (black) where to keep the
source; both or neither. A bad image (not decodable, wrong size, a mask with other values) is a 422
naming its field.

Limits: steps 1-1000 and ≤ T; n 1-64; n × NFE ≤ 6,400 per request (NFE: network evaluations per image,
the steps for most samplers, 2·steps − 1 for heun, RePaint's down moves when inpainting); guidance 0-20;
guidance_rescale 0-1; η 0-1; every float finite; request bodies ≤ 64 KiB (413 beyond); at most 4 requests
holding or waiting for the model (a 503 with Retry-After beyond, or after 120 s of waiting). A bad request is a 422 whose body names the
field: {"detail": [{"loc", "msg", "type"}], "field", "message"}. A request that fails inside the
sampler is a 500 with a message; the server keeps serving. fastapi and pydantic are imported lazily,
inside create_app: the rest of the repo runs without them.
"""
# No `from __future__ import annotations` here: FastAPI must see the request model classes themselves,
# and they are local to create_app, so string annotations could not be resolved.

import base64
import binascii
import contextlib
import io
import threading
import time
from pathlib import Path
from typing import Annotated, Literal, Optional

import torch

from shared.diffusion.guidance import MAX_GUIDANCE
from shared.diffusion.inpainting import DEFAULT_JUMP_LENGTH, DEFAULT_RESAMPLINGS, INPAINT_SAMPLERS, MAX_RESAMPLINGS
from shared.diffusion.samplers import SAMPLERS, SamplerOptions, count_nfe, default_steps, sample
from shared.diffusion.schedule import alpha_bar_at
from shared.errors import USER_ERRORS, UserError
from shared.interface.prompts import CLASS_NAMES, NUMBER_WORDS, parse_prompt
from shared.interface.sampling_args import inpainting_from_png
from shared.records.trajectory import TrajectoryRecorder
from shared.records.images import grid_image

MAX_STEPS, MAX_N, MAX_SEED = 1000, 64, 2**63 - 1
MAX_IMAGE_STEPS = 6400           # n × NFE of one request: 64 images × 100 steps, or 6 × 1000
# A valid request is under 300 bytes, or about 1.5 KB with an MNIST inpainting pair; two 64×64 RGB PNGs in
# base64 stay under 48 KiB.
MAX_BODY_BYTES = 64 * 1024
MAX_IMAGE_FIELD = 48 * 1024      # characters of one base64 image field
MAX_PENDING = 4                  # requests running or waiting for the model
QUEUE_WAIT_S = 120.0             # a request waits this long for the model before a 503
RETRY_AFTER_S = 5
MAX_TRAJECTORY_FRAMES = 60       # /trajectory returns at most this many evenly spaced steps
STATIC_DIR = Path(__file__).resolve().parent / "static"


def png_base64(image: torch.Tensor) -> str:
    """One image [C x H x W] in [−1, 1] as a base64 PNG (values outside are clipped)."""
    buf = io.BytesIO()
    grid_image(image[None], nrow=1, padding=0).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class Busy(Exception):
    """The model is taken and the queue is full (or the wait ran out)."""


class JobQueue:
    """One sampling job at a time on the shared model; at most `capacity` requests running or waiting,
    each waiting at most `wait_s`."""

    def __init__(self, capacity: int = MAX_PENDING, wait_s: float = QUEUE_WAIT_S):
        self.capacity, self.wait_s, self.pending = capacity, wait_s, 0
        self._model = threading.Lock()
        self._count = threading.Lock()

    @contextlib.contextmanager
    def slot(self):
        with self._count:
            if self.pending >= self.capacity:
                raise Busy(f"{self.pending} requests are running or waiting")
            self.pending += 1
        try:
            if not self._model.acquire(timeout=self.wait_s):
                raise Busy(f"waited {self.wait_s:g} s for the model")
            try:
                yield
            finally:
                self._model.release()
        finally:
            with self._count:
                self.pending -= 1


class LimitBody:
    """ASGI middleware: a request body over `limit` bytes is a 413 before the app reads any of it
    (declared Content-Length) or as soon as the running total passes the limit (chunked bodies)."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def _reject(self, send) -> None:
        body = (f'{{"detail": "request body over {self.limit} bytes", "field": null, '
                f'"message": "request body over {self.limit} bytes"}}').encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._reject(send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                return await self._reject(send)
        replayed = False

        async def replay():  # the body once, then whatever the client sends next (a disconnect)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)


def invalid_body(errors: list[tuple[str | None, str, str]]) -> dict:
    """The 422 body: JSON-safe (no echoed input, which may be NaN or huge), naming each field."""
    detail = [{"loc": ["body"] + ([field] if field else []), "msg": msg, "type": kind} for field, msg, kind in errors]
    message = "; ".join(f"{field}: {msg}" if field else msg for field, msg, _ in errors)
    return {"detail": detail, "field": errors[0][0] if errors else None, "message": message}


def pydantic_errors(errors) -> list[tuple[str | None, str, str]]:
    """(field, message, type) of each pydantic error; the field is the body key the error is about."""
    out = []
    for err in errors:
        keys = [str(part) for part in err.get("loc", ()) if part != "body"]
        out.append((keys[0] if keys else None, str(err.get("msg", "invalid")), str(err.get("type", "value_error"))))
    return out


def class_names(num_classes: int, dataset: str | None) -> list[str]:
    """What the page labels class k with: the dataset's class name, else the number word, else k."""
    names = CLASS_NAMES.get(dataset or "", NUMBER_WORDS)
    return [names[k] if k < len(names) else str(k) for k in range(num_classes)]


def probe_fused(model: torch.nn.Module, schedule, device: torch.device, precision: str = "fp32") -> None:
    """One 1-step, 1-image sample through the fused U-Net ops and the fused step, at start-up: a server
    that cannot run them stops with one line instead of failing every request."""
    labels = None if not model.num_classes else torch.zeros(1, dtype=torch.long)
    try:
        opts = SamplerOptions(sampler="ddim", num_steps=1, precision=precision, fused_step=True)
        sample(model, schedule, [0], opts, labels, device, progress=False)
    except USER_ERRORS as err:
        raise UserError(f"--fused-kernels cannot run here: {err}") from None
    except Exception as err:  # noqa: BLE001 - a driver or compiler failure is the same verdict
        reason = (str(err).strip().splitlines() or [""])[0]
        raise UserError(f"--fused-kernels cannot run here: {type(err).__name__}: {reason}") from None


def public(params: dict) -> dict:
    """A resolved request as the response states it: the inpainting as its settings, not its tensors."""
    inpainting = params.get("inpainting")
    shown = {k: v for k, v in params.items() if k != "inpainting"}
    shown["inpaint"] = None if inpainting is None else {
        "jump_length": inpainting.jump_length, "resamplings": inpainting.resamplings,
        "filled_pixels": int(inpainting.mask.any(dim=0).sum())}
    return shown


class Invalid(Exception):
    """A request the model cannot serve: a 422 naming `field` (None: the request as a whole)."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field, self.message = field, message


class SamplingFailed(Exception):
    """A fault inside the sampler (not the request's): a 500 with the reason."""


class Service:
    """What the endpoints do, apart from HTTP: resolve a request against the model's limits, sample
    under the queue, and state the limits."""

    def __init__(self, model: torch.nn.Module, schedule, meta: dict, device: torch.device, precision: str,
                 fused_step: bool, queue: JobQueue):
        self.model, self.schedule, self.meta, self.device = model, schedule, meta, device
        self.precision, self.fused_step, self.queue = precision, fused_step, queue
        self.num_classes, self.num_timesteps = int(model.num_classes), int(schedule.num_timesteps)

    def resolve(self, req, n: int) -> dict:
        """The request with the model's limits applied and defaults filled in; Invalid on a mismatch.
        params["inpainting"] holds the decoded Inpainting (or None); `public(params)` is what is returned."""
        label = self._label(req)
        steps = default_steps(req.sampler, req.steps, self.num_timesteps)
        if steps > self.num_timesteps:
            raise Invalid("steps", f"steps must lie in [1, {self.num_timesteps}] for this model, got {steps}")
        if req.guidance_interval is not None and not req.guidance_interval[0] < req.guidance_interval[1]:
            raise Invalid("guidance_interval", f"guidance_interval needs lo < hi, got {list(req.guidance_interval)}")
        inpainting = self._inpainting(req)
        if inpainting is not None and req.sampler not in INPAINT_SAMPLERS:
            raise Invalid("sampler", f"inpainting runs on the samplers {', '.join(INPAINT_SAMPLERS)}, not {req.sampler}")
        params = {"label": label, "guidance_scale": req.guidance_scale if self.num_classes else None,
                  "sampler": req.sampler, "steps": steps, "seed": req.seed, "n": n, "eta": req.eta,
                  "clip_x0": req.clip_x0, "guidance_rescale": req.guidance_rescale,
                  "guidance_interval": None if req.guidance_interval is None else list(req.guidance_interval),
                  "seeds": [req.seed + i for i in range(n)], "inpainting": inpainting}
        try:
            params["nfe"] = count_nfe(self.options(params), self.num_timesteps)
        except UserError as err:
            raise Invalid(None, str(err)) from None
        if n * params["nfe"] > MAX_IMAGE_STEPS:
            raise Invalid("n", f"n × NFE = {n} × {params['nfe']} = {n * params['nfe']} exceeds {MAX_IMAGE_STEPS} "
                               f"per request (NFE: network evaluations per image); lower n or steps")
        if req.seed + n - 1 > MAX_SEED:
            raise Invalid("seed", f"seed + n − 1 must be <= {MAX_SEED}")
        return params

    def _label(self, req) -> int | None:
        """The class a request asks for (label or prompt), checked against the model."""
        num_classes = self.num_classes
        if req.label is not None and req.prompt is not None:
            raise Invalid("prompt", "give either label or prompt, not both")
        label = req.label
        if req.prompt is not None:
            try:
                label = parse_prompt(req.prompt, num_classes, self.meta.get("dataset"))
            except UserError as err:
                raise Invalid("prompt", str(err)) from None
        if num_classes == 0 and label is not None:
            raise Invalid("label", "this model is unconditional: it takes no label or prompt")
        if num_classes > 0 and label is None:
            raise Invalid("prompt", f"give a label in [0, {num_classes - 1}] or a prompt")
        if label is not None and label >= num_classes:
            raise Invalid("label", f"label must lie in [0, {num_classes - 1}], got {label}")
        return label

    def _inpainting(self, req):
        """The Inpainting of inpaint_image / inpaint_mask (base64 PNGs, or data: URLs), or None without them."""
        fields = {"inpaint_image": req.inpaint_image, "inpaint_mask": req.inpaint_mask}
        if all(v is None for v in fields.values()):
            return None
        missing = [field for field, text in fields.items() if text is None]
        if missing:
            raise Invalid(missing[0], "inpainting needs both inpaint_image and inpaint_mask")
        files = {}
        for field, text in fields.items():
            try:
                files[field] = base64.b64decode(text.split(",", 1)[1] if text.startswith("data:") else text,
                                                validate=True)
            except (binascii.Error, ValueError):
                raise Invalid(field, f"{field} must be a base64-encoded image file") from None
        shape = (self.model.in_channels, self.model.image_size, self.model.image_size)
        try:
            return inpainting_from_png(files["inpaint_image"], files["inpaint_mask"], shape, req.jump_length,
                                       req.resamplings, names=("inpaint_image", "inpaint_mask"))
        except UserError as err:
            field = "inpaint_mask" if str(err).startswith("inpaint_mask") else "inpaint_image"
            raise Invalid(field, str(err)) from None

    def run(self, params: dict, callback=None) -> tuple[torch.Tensor, float]:
        """Samples under the queue: (images [n x C x H x W] float32 on the CPU, seconds).
        Raises Busy, Invalid or SamplingFailed."""
        labels = None if params["label"] is None else torch.full((params["n"],), params["label"])
        try:
            with self.queue.slot():
                start = time.perf_counter()
                images = sample(self.model, self.schedule, params["seeds"], self.options(params), labels,
                                self.device, callback, progress=False)
                images = images.float().cpu()  # waits for the device, so the time below is the sampling's
                seconds = time.perf_counter() - start
        except Busy:
            raise
        except UserError as err:
            raise Invalid(None, str(err)) from None
        except Exception as err:  # noqa: BLE001 - one failed request must not take the server down
            raise SamplingFailed(f"sampling failed: {type(err).__name__}: {err}") from None
        if not bool(torch.isfinite(images).all()):
            raise SamplingFailed("sampling failed: the model produced NaN or infinite values (a diverged checkpoint?)")
        return images, seconds

    def options(self, params: dict) -> SamplerOptions:
        """The SamplerOptions of a resolved request, at this server's precision and kernels."""
        interval = params["guidance_interval"]
        return SamplerOptions(sampler=params["sampler"], num_steps=params["steps"], eta=params["eta"],
                              clip_x0=params["clip_x0"], guidance_scale=params["guidance_scale"] or 1.0,
                              precision=self.precision, fused_step=self.fused_step,
                              guidance_rescale=params["guidance_rescale"],
                              guidance_interval=None if interval is None else tuple(interval),
                              inpaint=params["inpainting"])

    def trajectory(self, params: dict) -> dict:
        """One sample with x_t and x̂0 at up to MAX_TRAJECTORY_FRAMES evenly spaced steps, with t and ᾱ_t."""
        recorder = TrajectoryRecorder()
        images, seconds = self.run(params, callback=recorder)
        count = len(recorder.timesteps)
        shown = min(count, MAX_TRAJECTORY_FRAMES)
        picks = sorted({round(i * (count - 1) / max(shown - 1, 1)) for i in range(shown)})
        ts = recorder.timesteps  # ints, or fractional timesteps for euler / heun
        frames = [{"step": i, "t": ts[i] if isinstance(ts[i], int) else round(float(ts[i]), 3),
                   "alpha_bar": alpha_bar_at(self.schedule, ts[i]),
                   "x_t": png_base64(recorder.x_t[i][0]), "x0": png_base64(recorder.x0[i][0])} for i in picks]
        return {"frames": frames, "final": png_base64(images[0]), "parameters": public(params),
                "timing": {"seconds": seconds, "steps": count}}

    def health(self) -> dict:
        return {"status": "ok", "num_classes": self.num_classes, "image_shape": list(self.meta.get("image_shape") or []),
                "num_timesteps": self.num_timesteps, "device": str(self.device), "dataset": self.meta.get("dataset")}

    def limits(self) -> dict:
        T = self.num_timesteps
        return {"max_steps": min(MAX_STEPS, T), "num_timesteps": T, "max_n": MAX_N,
                "max_image_steps": MAX_IMAGE_STEPS, "max_guidance": MAX_GUIDANCE, "max_seed": MAX_SEED,
                "max_eta": 1.0, "max_body_bytes": MAX_BODY_BYTES, "max_pending": self.queue.capacity,
                "queue_wait_s": self.queue.wait_s, "max_trajectory_frames": MAX_TRAJECTORY_FRAMES,
                "samplers": {s: default_steps(s, None, T) for s in SAMPLERS}, "inpaint_samplers": list(INPAINT_SAMPLERS),
                "max_resamplings": MAX_RESAMPLINGS, "max_guidance_rescale": 1.0, "num_classes": self.num_classes,
                "image_shape": [self.model.in_channels, self.model.image_size, self.model.image_size],
                "class_names": class_names(self.num_classes, self.meta.get("dataset")),
                "dataset": self.meta.get("dataset")}


def create_app(model: torch.nn.Module, schedule, meta: dict, device: torch.device, *, precision: str = "fp32",
               fused_step: bool = False, queue: JobQueue | None = None):
    """The FastAPI app serving `model` (already loaded, in eval mode, on `device`)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles

    service = Service(model, schedule, meta, device, precision, fused_step, queue or JobQueue())
    GenerateRequest, TrajectoryRequest = request_models()
    app = FastAPI(title="ddpm-from-scratch", description=__doc__)
    app.add_middleware(LimitBody, limit=MAX_BODY_BYTES)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse(invalid_body(pydantic_errors(exc.errors())), status_code=422)

    @app.exception_handler(Invalid)
    async def on_invalid(request: Request, exc: Invalid):
        return JSONResponse(invalid_body([(exc.field, exc.message, "value_error")]), status_code=422)

    @app.exception_handler(Busy)
    async def on_busy(request: Request, exc: Busy):
        message = f"busy ({exc}); retry in {RETRY_AFTER_S} s"
        return JSONResponse({"detail": message, "field": None, "message": message}, status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(SamplingFailed)
    async def on_failure(request: Request, exc: SamplingFailed):
        return JSONResponse({"detail": str(exc), "field": None, "message": str(exc)}, status_code=500)

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.get("/health")(service.health)
    app.get("/limits")(service.limits)

    @app.post("/generate")
    def generate(req: GenerateRequest) -> dict:
        params = service.resolve(req, req.n)
        images, seconds = service.run(params)
        return {"images": [png_base64(img) for img in images], "parameters": public(params),
                "timing": {"seconds": seconds, "images_per_s": params["n"] / seconds}}

    @app.post("/trajectory")
    def trajectory(req: TrajectoryRequest) -> dict:
        return service.trajectory(service.resolve(req, 1))

    return app


def request_models():
    """(GenerateRequest, TrajectoryRequest): the pydantic request bodies; every float must be finite."""
    from pydantic import BaseModel, ConfigDict, Field

    NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]  # an EDM noise level σ

    class TrajectoryRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        label: Optional[int] = Field(None, ge=0, description="class index")
        prompt: Optional[str] = Field(None, max_length=100, description="class as text: 'seven', '7'")
        guidance_scale: float = Field(3.0, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)
        sampler: Literal[SAMPLERS] = "ddim"  # type: ignore[valid-type]
        steps: Optional[int] = Field(None, ge=1, le=MAX_STEPS)
        seed: int = Field(0, ge=0, le=MAX_SEED)
        eta: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
        clip_x0: bool = True
        guidance_rescale: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
        guidance_interval: Optional[tuple[NonNegative, NonNegative]] = None
        inpaint_image: Optional[str] = Field(None, max_length=MAX_IMAGE_FIELD, description="base64 PNG: the source")
        inpaint_mask: Optional[str] = Field(None, max_length=MAX_IMAGE_FIELD,
                                            description="base64 PNG: 255 = draw, 0 = keep the source")
        jump_length: int = Field(DEFAULT_JUMP_LENGTH, ge=1, le=MAX_STEPS)
        resamplings: int = Field(DEFAULT_RESAMPLINGS, ge=1, le=MAX_RESAMPLINGS)

    class GenerateRequest(TrajectoryRequest):
        n: int = Field(4, ge=1, le=MAX_N)

    return GenerateRequest, TrajectoryRequest
