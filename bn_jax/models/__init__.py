"""bn_jax.models"""
