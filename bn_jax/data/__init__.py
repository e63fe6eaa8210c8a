"""bn_jax.data"""
