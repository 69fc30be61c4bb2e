"""How long a checkpoint save blocks the training loop, against how long the save takes.

The state is the AdamW TrainState of ``configs/llama_1b.yaml`` (fp32 params + two fp32 moments),
as random arrays of the shapes ``jax.eval_shape`` gives, sharded as the trainer shards them over
this machine's devices. For each save:

* ``blocked``: seconds inside ``Checkpoints.save``: the arrays are copied to host memory and the
  write is handed to a background thread. This is all the training loop waits for.
* ``committed``: seconds from the call until the step directory is committed (renamed into
  place), with the loop doing simulated training steps meanwhile, and ``write only`` the part
  of that after ``save`` returned.
* a synchronous save (``checkpoint.async_save=false``) of the same state, for comparison: there
  the loop waits for everything.

Full depth (16 layers, 886M parameters) is 10.6 GB of state, and a save holds a host copy of it
too: ~21 GB, more than a 24 GB box has free beside other work. So ``--num-layers`` defaults to 4
(320M parameters, 3.8 GB of state); the bench checks free memory and disk first.

Usage::

    python bench/checkpoint.py                   # 4 layers, 3 async saves + 1 sync save, in a temp dir
    python bench/checkpoint.py --num-layers 16 --dir /big/disk --saves 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def available_memory() -> int:
    """Bytes of memory the kernel can still hand out (MemAvailable)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def random_state(setup):
    """A TrainState of standard-normal fp32 arrays in the trainer's shardings (made on device)."""
    import jax

    leaves, tree = jax.tree.flatten(setup.abstract_state)
    shardings = jax.tree.leaves(setup.state_shardings)

    def make(key):
        keys = jax.random.split(key, len(leaves))
        return tree.unflatten([jax.random.normal(k, x.shape, x.dtype) if x.ndim else jax.numpy.zeros((), x.dtype)
                               for k, x in zip(keys, leaves)])

    return jax.jit(make, out_shardings=tree.unflatten(shardings))(jax.random.key(0))


def fake_step(state):
    """Simulated training: touch every array (reads and writes the whole state)."""
    import jax

    return jax.tree.map(lambda x: x * 0.999 if x.ndim else x + 1, state)


def timed_saves(setup, state, directory: str, async_save: bool, saves: int, train_steps: int):
    """``(timings of each save, the state after the simulated steps)``."""
    import jax

    from t5x_lite.checkpoints import Checkpoints

    cfg = setup.cfg
    cfg.checkpoint.async_save = async_save
    cfg.checkpoint.keep = 1
    ckpt = Checkpoints(directory, cfg)
    step_fn = jax.jit(fake_step, donate_argnums=0)
    out = []
    for i in range(saves):
        t0 = time.perf_counter()
        ckpt.save(i + 1, state, {"bench": True})
        blocked = time.perf_counter() - t0
        for _ in range(train_steps):  # the loop goes on while the bytes are written
            state = step_fn(state)
        jax.block_until_ready(state)
        trained = time.perf_counter() - t0 - blocked
        ckpt.wait()
        committed = time.perf_counter() - t0
        out.append({"blocked_s": blocked, "committed_s": committed, "write_only_s": committed - blocked,
                    "loop_ran_s": trained})
    ckpt.close()
    return out, state


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "llama_1b.yaml"))
    p.add_argument("--num-layers", type=int, default=4, help="model.num_layers (16 = the full 886M model)")
    p.add_argument("--saves", type=int, default=3, help="async saves to time (plus one synchronous)")
    p.add_argument("--train-steps", type=int, default=2, help="simulated steps run between an async save's "
                   "start and the wait for its commit")
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir, removed after)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)

    import logging

    import jax

    from t5x_lite import partitioning
    from t5x_lite.config import load_config
    from t5x_lite.trainer import make_setup

    # Orbax counts our explicit waits for a commit as "waiting for the previous save" and warns.
    logging.getLogger("absl").setLevel(logging.ERROR)

    cfg = load_config(args.config, [f"model.num_layers={args.num_layers}", "mesh.data=1", "mesh.fsdp=-1",
                                    "mesh.tensor=1", f"train.batch_size={jax.device_count()}"])
    setup = make_setup(cfg, partitioning.make_mesh(cfg))
    leaves = jax.tree.leaves(setup.abstract_state)
    state_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(setup.abstract_state.params))
    root = args.dir or tempfile.mkdtemp(prefix="t5x_lite_bench_ckpt_")
    os.makedirs(root, exist_ok=True)
    # Device arrays + the host copy a save holds + one simulated step's output.
    need_memory, need_disk = 3 * state_bytes, 2 * state_bytes
    if available_memory() < need_memory or shutil.disk_usage(root).free < need_disk:
        print(f"error: {num_params / 1e6:.0f}M parameters with AdamW is {state_bytes / 2**30:.1f} GiB of state; the "
              f"bench needs {need_memory / 2**30:.1f} GiB of memory ({available_memory() / 2**30:.1f} available) and "
              f"{need_disk / 2**30:.1f} GiB of disk at {root} ({shutil.disk_usage(root).free / 2**30:.1f} free); "
              "lower --num-layers or pass --dir", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    state = jax.block_until_ready(random_state(setup))
    print(f"state: {num_params:,} params ({args.num_layers} layers), {state_bytes / 2**30:.2f} GiB with AdamW, "
          f"on {jax.device_count()} {jax.devices()[0].platform} device(s); made in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    try:
        async_runs, state = timed_saves(setup, state, os.path.join(root, "async"), True, args.saves, args.train_steps)
        sync_run = timed_saves(setup, state, os.path.join(root, "sync"), False, 1, 0)[0][0]
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)

    gib = state_bytes / 2**30
    result = {"num_params": num_params, "num_layers": args.num_layers, "state_gib": gib,
              "devices": jax.device_count(), "platform": jax.devices()[0].platform,
              "async": async_runs, "sync": sync_run}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'save':>6} {'blocked s':>10} {'committed s':>12} {'write only s':>13} {'loop ran s':>11} {'GiB/s':>7}")
    for i, r in enumerate(async_runs, 1):
        print(f"{'async ' + str(i):>6} {r['blocked_s']:10.2f} {r['committed_s']:12.2f} {r['write_only_s']:13.2f} "
              f"{r['loop_ran_s']:11.2f} {gib / r['committed_s']:7.2f}")
    print(f"{'sync':>6} {sync_run['blocked_s']:10.2f} {sync_run['committed_s']:12.2f} {'':>13} {'':>11} "
          f"{gib / sync_run['committed_s']:7.2f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
