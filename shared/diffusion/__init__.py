"""The diffusion math: schedules, the forward process, sampler steps and loops, guidance, per-sample noise."""
