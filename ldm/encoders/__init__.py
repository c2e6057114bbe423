"""The frozen parts of a pipeline: the VAE (images <-> latents), the CLIP text encoder (prompts ->
context) and its tokenizer."""
