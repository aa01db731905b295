"""The shared core: the diffusion math, the U-Net, data, training, evaluation, records and the interface.

Every stage script imports from here; each idea lives here once. The names below are the ones a reader
reaches for first.
"""
from shared.diffusion.forward import q_sample
from shared.errors import UserError
from shared.diffusion.schedule import NoiseSchedule, extract
from shared.model.unet import UNet

__all__ = ["NoiseSchedule", "extract", "q_sample", "UNet", "UserError"]

