"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""

import os

# Fake devices, and CPU code generation that compiles ~4x faster: the tests are compile-bound
# and compare programs built with the same flags (also in the subprocesses they start).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
assert jax.device_count() == 8, f"tests expect 8 fake devices, got {jax.device_count()}"

# One persistent compilation cache for the session: the CLI runs that tests start in
# subprocesses compile the same programs again, and read them from here instead.
import tempfile  # noqa: E402

_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="t5x_lite_jax_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
