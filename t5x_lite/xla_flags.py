"""The XLA flags the launchers set for training on NVIDIA GPUs, one place for all of them.

``launch/local.sh`` (and so ``launch/multihost.sh``) on a host with GPUs and
``launch/slurm.sbatch`` put these first in ``XLA_FLAGS`` and the user's own ``XLA_FLAGS`` after
them: XLA keeps the last of two settings of a flag, so a user's setting wins.
``T5X_LITE_XLA_GPU_FLAGS=0`` leaves ``XLA_FLAGS`` as it is. Nothing here imports jax:

    python -m t5x_lite.xla_flags             # the flags, one line (what the launchers read)
    python -m t5x_lite.xla_flags --explain   # each with why it is set

Not set, because measured slower on one H100 (2026-11-23, llama_1b's step 194.7 -> 212.1 ms):
``--xla_gpu_enable_triton_gemm=false`` (cuBLAS for every matmul; XLA's Triton GEMMs take the
neighbouring elementwise work into them).
"""

from __future__ import annotations

import sys

GPU_TRAINING_FLAGS = (
    ("--xla_gpu_enable_latency_hiding_scheduler=true",
     "schedule collectives (FSDP all-gathers, gradient reduce-scatters) to overlap with compute instead of "
     "running them where they are first needed"),
    ("--xla_gpu_all_gather_combine_threshold_bytes=134217728",
     "combine small all-gathers into ones of up to 128 MiB: one per layer's weights, not one per matrix"),
    ("--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728", "the same for gradient reduce-scatters"),
    ("--xla_gpu_all_reduce_combine_threshold_bytes=134217728", "the same for all-reduces (data parallelism)"),
    ("--xla_gpu_enable_pipelined_all_gather=true",
     "inside the layer scan, gather layer i+1's weights while layer i computes"),
    ("--xla_gpu_enable_pipelined_reduce_scatter=true",
     "inside the layer scan, reduce-scatter layer i-1's gradients while layer i computes"),
    ("--xla_gpu_enable_pipelined_all_reduce=true", "the same for all-reduces"),
    ("--xla_gpu_enable_while_loop_double_buffering=true",
     "unroll the layer scan by two so that the pipelined collectives have a buffer to fill"),
    ("--xla_gpu_enable_highest_priority_async_stream=true",
     "give the collectives' stream priority, so overlapped communication is not starved by compute"),
)


def gpu_flags() -> str:
    return " ".join(flag for flag, _ in GPU_TRAINING_FLAGS)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["--explain"]):
        print("usage: python -m t5x_lite.xla_flags [--explain]", file=sys.stderr)
        return 2
    if argv:
        for flag, why in GPU_TRAINING_FLAGS:
            print(f"{flag}\n    {why}")
    else:
        print(gpu_flags())
    return 0


if __name__ == "__main__":
    sys.exit(main())
