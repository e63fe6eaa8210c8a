"""bn_jax.training"""
