"""The shared core: schedules, the forward process, the U-Net, data and small utilities.

Every stage script imports from here; the math lives here once.
"""
from shared.diffusion import q_sample
from shared.errors import UserError
from shared.schedule import NoiseSchedule, extract
from shared.unet import UNet

__all__ = ["NoiseSchedule", "extract", "q_sample", "UNet", "UserError"]


def __getattr__(name):
    # The samplers' step functions live in shared.sampling; re-exported lazily so the core
    # imports without them.
    if name in ("ddpm_step", "ddim_step", "ddim_timesteps"):
        from shared import sampling
        return getattr(sampling, name)
    raise AttributeError(f"module 'shared' has no attribute {name!r}")
