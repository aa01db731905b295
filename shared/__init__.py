"""The shared core: schedules, the forward process, the U-Net, data and small utilities.

Every stage script imports from here; the math lives here once.
"""
from shared.diffusion.forward import q_sample
from shared.errors import UserError
from shared.diffusion.schedule import NoiseSchedule, extract
from shared.model.unet import UNet

__all__ = ["NoiseSchedule", "extract", "q_sample", "UNet", "UserError"]


def __getattr__(name):
    # The samplers' step functions live in shared.diffusion.steps; re-exported lazily so the core
    # imports without them.
    if name in ("ddpm_step", "ddim_step", "ddim_timesteps"):
        from shared.diffusion import steps as sampling
        return getattr(sampling, name)
    raise AttributeError(f"module 'shared' has no attribute {name!r}")
