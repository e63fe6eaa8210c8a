"""bn_jax.analysis"""
