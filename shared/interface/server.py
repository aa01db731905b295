"""The HTTP API of stage 5: a FastAPI app that samples from one model loaded at start-up.

    POST /generate  {"label": 7 | "prompt": "seven", "guidance_scale": 3, "sampler": "ddim", "steps": 50,
                     "seed": 0, "n": 4}
        → {"images": [base64 PNG, …], "parameters": {resolved request}, "timing": {"seconds", "images_per_s"}}
    GET  /health    → {"status": "ok", "num_classes", "image_shape", "num_timesteps", "device"}

Validation (pydantic, then the model's own limits): steps 1-1000 and ≤ T, n 1-64, guidance 0-20, label
in range, prompt readable, not both label and prompt. Any bad request is a 422 with a message. A
request that fails inside the sampler is a 500 with a message; the server keeps serving. fastapi and
pydantic are imported lazily, inside create_app: the rest of the repo runs without them.
"""
# No `from __future__ import annotations` here: FastAPI must see the request model class itself, and
# GenerateRequest is local to create_app, so a string annotation could not be resolved.

import base64
import io
import threading
import time

import torch

from shared.errors import USER_ERRORS, UserError
from shared.diffusion.guidance import MAX_GUIDANCE
from shared.interface.prompts import parse_prompt
from shared.records.images import grid_image
from shared.diffusion.samplers import SAMPLERS, default_steps, sample

MAX_STEPS, MAX_N, MAX_SEED = 1000, 64, 2**63 - 1


def png_base64(image: torch.Tensor) -> str:
    """One image [C x H x W] in [−1, 1] as a base64 PNG."""
    buf = io.BytesIO()
    grid_image(image[None], nrow=1, padding=0).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def create_app(model: torch.nn.Module, schedule, meta: dict, device: torch.device, *, precision: str = "fp32",
               fused_step: bool = False):
    """The FastAPI app serving `model` (already loaded, in eval mode, on `device`)."""
    from typing import Literal, Optional

    from fastapi import FastAPI, HTTPException
    from pydantic import BaseModel, ConfigDict, Field

    num_classes, num_timesteps = int(model.num_classes), int(schedule.num_timesteps)
    lock = threading.Lock()  # one sampling job at a time: the model and device are shared

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        label: Optional[int] = Field(None, ge=0, description="class index")
        prompt: Optional[str] = Field(None, max_length=100, description="class as text: 'seven', '7'")
        guidance_scale: float = Field(3.0, ge=0.0, le=MAX_GUIDANCE)
        sampler: Literal[SAMPLERS] = "ddim"  # type: ignore[valid-type]
        steps: Optional[int] = Field(None, ge=1, le=MAX_STEPS)
        seed: int = Field(0, ge=0, le=MAX_SEED)
        n: int = Field(4, ge=1, le=MAX_N)
        eta: float = Field(0.0, ge=0.0, le=1.0)
        clip_x0: bool = True

    app = FastAPI(title="ddpm-from-scratch", description=__doc__)

    def reject(message: str):
        raise HTTPException(status_code=422, detail=message)

    def resolve(req: GenerateRequest) -> dict:
        """The request with the model's limits applied and defaults filled in; 422 on a mismatch."""
        if req.label is not None and req.prompt is not None:
            reject("give either label or prompt, not both")
        label = req.label
        if req.prompt is not None:
            try:
                label = parse_prompt(req.prompt, num_classes, meta.get("dataset"))
            except UserError as err:
                reject(str(err))
        if num_classes == 0 and label is not None:
            reject("this model is unconditional: it takes no label or prompt")
        if num_classes > 0 and label is None:
            reject(f"give a label in [0, {num_classes - 1}] or a prompt")
        if label is not None and label >= num_classes:
            reject(f"label must lie in [0, {num_classes - 1}], got {label}")
        steps = default_steps(req.sampler, req.steps, num_timesteps)
        if steps > num_timesteps:
            reject(f"steps must lie in [1, {num_timesteps}] for this model, got {steps}")
        return {"label": label, "guidance_scale": req.guidance_scale if num_classes else None,
                "sampler": req.sampler, "steps": steps, "seed": req.seed, "n": req.n, "eta": req.eta,
                "clip_x0": req.clip_x0, "seeds": [req.seed + i for i in range(req.n)]}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "num_classes": num_classes, "image_shape": list(meta.get("image_shape") or []),
                "num_timesteps": num_timesteps, "device": str(device), "dataset": meta.get("dataset")}

    @app.post("/generate")
    def generate(req: GenerateRequest) -> dict:
        params = resolve(req)
        labels = None if params["label"] is None else torch.full((params["n"],), params["label"])
        try:
            with lock:
                start = time.perf_counter()
                images = sample(model, schedule, params["seeds"], labels=labels, sampler=params["sampler"],
                                num_steps=params["steps"], eta=params["eta"], clip_x0=params["clip_x0"],
                                guidance_scale=params["guidance_scale"] or 1.0, device=device,
                                precision=precision, fused_step=fused_step, progress=False)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - start
        except USER_ERRORS as err:
            raise HTTPException(status_code=422, detail=str(err)) from None
        except Exception as err:  # noqa: BLE001 - one failed request must not take the server down
            raise HTTPException(status_code=500, detail=f"sampling failed: {type(err).__name__}: {err}") from None
        return {"images": [png_base64(img) for img in images.float().cpu()], "parameters": params,
                "timing": {"seconds": seconds, "images_per_s": params["n"] / seconds}}

    return app
