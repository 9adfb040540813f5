"""Test setup shared by every test file.

Eight virtual CPU devices, set before jax is first imported, so that multi-device meshes
(data x latent, stack x data) can be tested on one CPU. Tests that mean one device build their
mesh from ``jax.devices()[:1]``.
"""
import os

# The terminate timeout: on a loaded 2-core machine a virtual device can reach a collective long
# after the others (XLA's terminate timeout), and XLA then aborts the whole process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=600")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
