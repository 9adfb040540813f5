"""Test setup shared by every test file.

Eight virtual CPU devices, set before jax is first imported, so that multi-device meshes
(data x latent, stack x data) can be tested on one CPU. Tests that mean one device build their
mesh from ``jax.devices()[:1]``.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
