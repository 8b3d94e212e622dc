"""Test configuration: every test process sees 8 fake CPU devices (sharding and ring tests need them;
the rest use device 0). The flags must be set before jax is imported anywhere.

The tests compile thousands of small programs and run each a few times, so LLVM's optimisation of
the CPU code costs more than it saves: without it (`--xla_backend_optimization_level=0`; floating
point semantics are unchanged, fast math stays off) the suite takes about a quarter less time.
Subprocesses (the entry points, the benchmark scripts) inherit both flags."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
