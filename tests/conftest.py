"""Test configuration: every test process sees 8 fake CPU devices (sharding and ring tests need them;
the rest use device 0). The flag must be set before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
