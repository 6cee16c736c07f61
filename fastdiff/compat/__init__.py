"""Drop-in modules for code written against other diffusion libraries: ``fastdiff.compat.k_diffusion.sampling``
(k-diffusion's samplers and schedules, same names, signatures and numbers, on fastdiff's sampling loop)."""
