"""Training: the one loop (`loop.fit`, the only importer of accelerate), its resumable state and
checkpoints, the objectives of the U-Net, the VAE and CLIP, the recipe and the default model."""
