"""The maths of diffusion: the noise schedule, the samplers (plain loops over a model callable),
the training loss, and exact Gaussian denoisers to test them on. Imports no network."""
