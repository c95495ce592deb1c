"""perco-jax: ultra-low-bitrate perceptual image codec on Stable Diffusion 3, in JAX/Flax."""
__version__ = "0.1.0"
