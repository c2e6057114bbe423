"""Developer benchmarks of ldm against diffusers; the figures in docs/benchmarks.md.

Not part of the library: this folder sits at the repository root, outside the `ldm` package,
and is not in the wheel (pyproject's ``packages.find`` includes ``ldm*`` only). It imports
diffusers (and, for ``train``, accelerate), which the library proper never imports.

Run from the repository root:

    python -m benchmarks.run unet [--preset sd15] [--batch 2] [--size 32] [--repeats 7] [--json out.json]
    python -m benchmarks.run conv
    python -m benchmarks.run pipeline [--repeats 9]
    python -m benchmarks.run train [--model default] [--size small|tiny] [--steps 30] [--repeats 9]
    python -m benchmarks.run generate-default [--repeats 5]

Modules: `benchmarks.timing` (interleaved repeats, medians and spread; the machine's
description), `benchmarks.inference` (U-Net forward pass, single convolutions, the whole
pipeline, generation with the shipped default model), `benchmarks.training` (``ldm train``
against a diffusers-style training loop) and `benchmarks.run` (the command line).
"""
