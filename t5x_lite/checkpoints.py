"""Orbax checkpoints of the whole training state, and exports of the parameters alone.

A checkpoint ``WORKDIR/checkpoints/<step>`` holds three items: ``params`` and ``opt_state``
(sharded arrays in OCDBT/zarr, each process writing its own shards; separate so that serving
reads the params alone) and ``meta`` (JSON). A run's future is fixed by the state, the step, the
seed and the data: batches are a pure function of the step and dropout keys are
``fold_in(key(train.seed), step)``. So ``meta`` records the step, the seed, the batch size and
fingerprints of the training token stream and of the tokenizer, and ``check_resume`` refuses to
continue a checkpoint on other data or with another seed. The resolved config and the tokenizer
live beside the checkpoints, in the work dir.

Saves are asynchronous: ``save`` returns once the arrays are copied to host memory and a
background thread writes them while training goes on; the next save, and ``close``, wait for it.
Orbax writes a step into ``<step>.orbax-checkpoint-tmp-*`` and renames it when complete, so a save
that dies half-way never looks complete: the next run reports it and resumes from the previous
complete step. A damaged checkpoint (a file truncated or deleted) raises ``CheckpointError``
naming the step, the path and the array; with ``checkpoint.fallback`` it is moved aside to
``WORKDIR/checkpoints.damaged`` and the previous one is used. Restores go straight into the target
shardings of the current run (every process reads only the slices its devices hold), whatever
mesh or ZeRO stage wrote the checkpoint.

``t5x-lite export`` writes a self-contained directory: ``params/`` (orbax), ``config.yaml``,
``tokenizer.model`` and ``export.json``; ``load_for_inference`` reads it or a work dir. Nothing
here unpickles: arrays are zarr, metadata JSON, configs YAML read with ``yaml.safe_load``.
"""

from __future__ import annotations

import fcntl
import gc
import hashlib
import json
import logging
import os
import shutil
import sys
import traceback
import warnings
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml

from t5x_lite import partitioning
from t5x_lite.config import CheckpointConfig, Config, ConfigError, config_from_dict
from t5x_lite.data import DataError, Tokenizer
from t5x_lite.models import abstract_params

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints.damaged"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.model"
EXPORT_FILE = "export.json"
LOCK_FILE = ".train.lock"
ITEMS = ("params", "opt_state", "meta")


class CheckpointError(DataError):
    """A checkpoint that cannot be used (damaged, missing, another run's); names step and path."""


# ------------------------------------------------------------------- the manager


class _NotReadOnlyNotice(logging.Filter):
    NOTICES = ("Given directory is read only", "read_only=True, setting save_interval_steps")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.NOTICES)


def _filter_once(logger: str, notice: type[logging.Filter]) -> None:
    """Add a filter of type ``notice`` to ``logger`` unless it has one."""
    log = logging.getLogger(logger)
    if not any(isinstance(f, notice) for f in log.filters):
        log.addFilter(notice())


class Checkpoints:
    """``ocp.CheckpointManager`` over ``WORKDIR/checkpoints`` with the project's items and policies.

    ``read_only``: for readers (eval, export, decode) that may run beside a live training run; they
    neither save nor clean up its in-flight temporary directories. A writer holds the work dir's
    lock until ``close``: a second trainer there would delete the first one's unfinished saves."""

    def __init__(self, workdir: str, cfg: Config, read_only: bool = False):
        self.workdir = workdir
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
        self._lock = None if read_only or jax.process_index() else lock_workdir(workdir)
        # Unfinished saves of a killed run; the manager removes them as it starts (not read-only).
        self.interrupted = [] if read_only else interrupted_saves(self.directory)
        if read_only:  # orbax warns that a read-only manager is read-only; readers asked for exactly that
            _filter_once("absl", _NotReadOnlyNotice)
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=cfg.checkpoint.async_save,
            preservation_policy=preservation_policy(cfg.checkpoint),
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: Any, meta: dict, metrics: Optional[dict] = None) -> None:
        """Start saving a TrainState at ``step``; returns once the arrays are on the host.
        ``metrics`` (``{"eval_loss": x}``) rank checkpoints for ``checkpoint.keep_best``."""
        self.manager.save(
            step,
            args=ocp.args.Composite(params=ocp.args.StandardSave(state.params),
                                    opt_state=ocp.args.StandardSave(state.opt_state),
                                    meta=ocp.args.JsonSave(dict(meta, step=int(step)))),
            metrics=metrics,
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restore a TrainState into the shardings of ``abstract_state`` (ShapeDtypeStructs with
        ``sharding`` set): every process reads only the shards its devices hold."""
        out = self._restore(step, ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state.params),
            opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
            meta=ocp.args.JsonRestore()))
        meta = dict(out["meta"] or {})
        step_array = jax.device_put(np.int32(meta.get("step", step)), abstract_state.step.sharding)
        return type(abstract_state)(step=step_array, params=out["params"], opt_state=out["opt_state"]), meta

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the parameters (no optimizer state is read)."""
        return self._restore(step, ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))["params"]

    def _restore(self, step: int, args) -> dict:
        reason = None
        _quiet_late_reads()
        try:
            out = self.manager.restore(step, args=args)
        except Exception as e:  # tensorstore / orbax raise bare Exception, ValueError, FileNotFoundError
            out, reason = None, _root_cause(e)
        if reason is not None:
            _drop_failed_reads()
        if not _all_processes_ok(reason is None):
            raise CheckpointError(f"checkpoint at step {step} ({self.step_path(step)}) cannot be read: "
                                  f"{reason or 'another process could not read its shards'}")
        return out

    def restore_latest(self, abstract_state: Any, fallback: bool, log: Callable[[str], None]):
        """``(step, state, meta)`` of the newest readable checkpoint, or None when there is none.

        Says which unfinished saves are discarded. A damaged checkpoint raises ``CheckpointError``;
        with ``fallback`` the ones before it are tried, and once one is read the damaged newer ones
        are moved to ``WORKDIR/checkpoints.damaged`` (nothing is moved if none can be read)."""
        for step, path in self.interrupted:
            log(f"checkpoint at step {step} was never completed (its save was interrupted): discarding {path}")
        steps = self.all_steps()[::-1]
        damaged = []
        for i, step in enumerate(steps):
            previous = steps[i + 1] if i + 1 < len(steps) else None
            try:
                state, meta = self.restore(step, abstract_state)
            except CheckpointError as e:
                if not fallback:
                    hint = "" if previous is None else (
                        f"\n--set checkpoint.fallback=true resumes from step {previous} instead (the damaged one is "
                        f"moved to {os.path.join(self.workdir, DAMAGED_DIR)})")
                    raise CheckpointError(f"{e}{hint}") from None
                log(f"{e}\ncheckpoint.fallback=true: "
                    + (f"falling back to step {previous}" if previous is not None else "no earlier checkpoint"))
                damaged.append(step)
                continue
            for bad in damaged:
                log(f"moved the damaged checkpoint at step {bad} to {self.set_aside(bad)}")
            if self.interrupted and max(s for s, _ in self.interrupted) > step:
                log(f"using step {step}, the latest complete checkpoint")
            return step, state, meta
        if steps:
            raise CheckpointError(f"no checkpoint in {self.directory} can be read (steps {steps}); see above")
        return None

    def set_aside(self, step: int) -> str:
        """Move a damaged step directory out of the manager's sight (kept for inspection)."""
        target = os.path.join(self.workdir, DAMAGED_DIR, str(step))
        if jax.process_index() == 0:
            n = 1
            while os.path.exists(target):
                target, n = os.path.join(self.workdir, DAMAGED_DIR, f"{step}.{n}"), n + 1
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(self.step_path(step), target)
        _sync_processes(f"t5x_lite_set_aside_{step}")
        self.manager.reload()
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
        if self._lock is not None:
            self._lock.close()  # releases the lock
            self._lock = None


def lock_workdir(workdir: str):
    """An open file holding an exclusive POSIX lock on ``WORKDIR/.train.lock`` (released when it is
    closed or the process ends, however it ends)."""
    os.makedirs(workdir, exist_ok=True)
    f = open(os.path.join(workdir, LOCK_FILE), "a+")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        owner = f.read().strip() or "another process"
        f.close()
        raise ConfigError(f"work dir {workdir} is in use by {owner}; wait for it to end or use another --workdir") \
            from None
    f.truncate(0)
    f.write(f"training process {os.getpid()} on {os.uname().nodename}")
    f.flush()
    return f


def preservation_policy(c: CheckpointConfig):
    """The last ``keep`` checkpoints; with ``keep_best`` also the one with the lowest eval loss."""
    latest = ocp.checkpoint_managers.LatestN(n=c.keep)
    if not c.keep_best:
        return latest
    best = ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=1,
                                         keep_checkpoints_without_metrics=False)
    return ocp.checkpoint_managers.AnyPreservationPolicy([latest, best])


def interrupted_saves(directory: str) -> list[tuple[int, str]]:
    """``(step, path)`` of step directories whose save began and was never finalized."""
    if not os.path.isdir(directory):
        return []
    names = [n for n in os.listdir(directory) if ocp.path.step.TMP_DIR_SUFFIX in n]
    return sorted((ocp.path.step.step_from_checkpoint_name(n), os.path.join(directory, n)) for n in names)


def _root_cause(error: BaseException) -> str:
    """The innermost cause's first line, without tensorstore's spec dump."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text.split(" [tensorstore_spec")[0]


def _quiet_late_reads() -> None:
    """Reads still running in TensorStore's threads when a restore fails finish afterwards and hand
    their results to orbax's event loop, which the failure has closed: each printed a traceback
    ending in ``RuntimeError: Event loop is closed`` into the log (one a shard: a fallback to an
    earlier checkpoint looked like a crash). Set before a restore, since they may finish before its
    error reaches ``_restore``: those and only those (``_late_read``) are dropped, anything else
    reaches the hook there was."""
    hook = sys.unraisablehook
    if getattr(hook, "drops_late_reads", False):
        return

    def drop_late_reads(unraisable):
        if not _late_read(unraisable):
            hook(unraisable)

    drop_late_reads.drops_late_reads = True
    sys.unraisablehook = drop_late_reads


def _late_read(unraisable) -> bool:
    """A read's result handed to a closed event loop: ``loop.call_soon_threadsafe`` called from
    TensorStore's thread (no Python frame above it) raising asyncio's closed-loop error."""
    frames = traceback.extract_tb(unraisable.exc_traceback)
    return (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
            and bool(frames) and frames[0].name == "call_soon_threadsafe")


class _FailedReadNotice(logging.Filter):
    """asyncio's "Future (Task) exception was never retrieved" for a shard read of a failed restore (its
    TensorStore error and spec, when the future is collected), whose reason the restore's
    ``CheckpointError`` has given already."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not ("exception was never retrieved" in record.getMessage()
                    and " [tensorstore_spec" in str(error))


def _drop_failed_reads() -> None:
    """A failed restore leaves orbax's other shard reads as coroutines and futures holding errors,
    which Python would print one by one (with a TensorStore spec each), now or when it exits:
    collect them now, quietly (coroutines never awaited warn as they are collected: not these),
    and keep asyncio from logging those collected later. The reason was already taken from the
    exception."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"coroutine .* was never awaited", RuntimeWarning)
            gc.collect()
    finally:
        sys.unraisablehook = hook
    _filter_once("asyncio", _FailedReadNotice)


def _all_processes_ok(ok: bool) -> bool:
    """True when ``ok`` holds on every process (a damaged shard may be seen by one host only)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------ resume checks


def data_fingerprint(batches) -> str:
    """sha256 of a batch source's sizes (documents, tokens, packed rows) and of its first row.
    Cheap whatever the corpus size, independent of the batch size, and it changes with the
    corpus, its split, the tokenizer, the packing or the seed."""
    h = hashlib.sha256(repr((batches.objective, batches.seq_len, batches.target_len, batches.num_documents,
                             batches.num_tokens, batches.rows_per_epoch)).encode())
    first_row = batches(0, 0, batches.batch_size)  # process 0 of batch_size processes: global row 0
    for key in sorted(first_row):
        h.update(key.encode())
        h.update(np.ascontiguousarray(first_row[key]))
    return h.hexdigest()


def run_meta(cfg: Config, train_batches, tokenizer) -> dict:
    """What, besides the step, fixes a run's future: stored in every checkpoint's ``meta``."""
    return {"seed": cfg.train.seed, "batch_size": cfg.train.batch_size,
            "data_fingerprint": data_fingerprint(train_batches), "tokenizer_sha256": tokenizer.sha256}


def check_resume(saved: dict, current: dict, where: str, log: Callable[[str], None]) -> None:
    """Refuse to continue checkpoint ``where`` (its ``meta`` is ``saved``) with another seed or other
    data; a changed batch size only moves the data position, which is said."""
    problems = []
    if saved.get("seed", current["seed"]) != current["seed"]:
        problems.append(f"train.seed={current['seed']}, but the checkpoint was trained with seed {saved['seed']} "
                        f"(it fixes the data order and dropout): use --set train.seed={saved['seed']}")
    for key, what in (("tokenizer_sha256", "tokenizer"), ("data_fingerprint", "training token stream")):
        if saved.get(key, current[key]) != current[key]:
            problems.append(f"the {what} differs from the one the checkpoint was trained on ({key} "
                            f"{saved[key][:12]}... != {current[key][:12]}...): the corpus or tokenizer file changed")
    if problems:
        raise DataError(f"checkpoint {where} cannot continue this run:\n  - " + "\n  - ".join(problems)
                        + "\nresume with the original data and seed, or start a new --workdir")
    if saved.get("batch_size", current["batch_size"]) != current["batch_size"]:
        log(f"note: train.batch_size changed from {saved['batch_size']} to {current['batch_size']}; the data "
            f"position is the step, so batches continue from row step x {current['batch_size']}")


# ------------------------------------------------------------------ work dirs and exports


def read_config(directory: str) -> Config:
    """The resolved config a work dir or an export holds (``config.yaml``, read with safe_load)."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} is neither a t5x_lite work dir nor an export: no {CONFIG_FILE}")
    with open(path) as f:
        return config_from_dict(yaml.safe_load(f) or {})


def tokenizer_path(cfg: Config, directory: str) -> str:
    """The copy in a work dir or export (the trainer keeps one there), else ``data.tokenizer``."""
    local = os.path.join(directory, TOKENIZER_FILE)
    return local if os.path.exists(local) or not cfg.data.tokenizer else cfg.data.tokenizer


def abstract_param_tree(cfg: Config, mesh) -> Any:
    """ShapeDtypeStructs of the parameters, sharded on ``mesh`` by the config's rules."""
    boxed = abstract_params(cfg)
    shardings = partitioning.shardings_from_logical(boxed, mesh, partitioning.logical_rules(cfg, mesh))
    return abstract_with_shardings(nn.meta.unbox(boxed), shardings)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def read_params(workdir: str, cfg: Config, target: Any, step: Optional[int] = None) -> tuple[int, Any]:
    """``(step, params)`` of a work dir's checkpoint ``step`` (default: the latest), restored into
    ``target``'s shardings, for the readers (eval, decode, export, export-hf). A step that is not
    there, or one that cannot be read, is an error that lists the steps there are to choose from
    with ``--step``."""
    ckpt = Checkpoints(workdir, cfg, read_only=True)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: train first")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise ConfigError(f"--step {step}: no checkpoint at that step in {ckpt.directory} "
                              f"(steps: {', '.join(map(str, steps))})")
        try:
            return step, ckpt.restore_params(step, target)
        except CheckpointError as e:
            others = [s for s in steps if s != step]
            hint = f"\nthe other steps here: {', '.join(map(str, others))} (--step N reads one)" if others else ""
            raise CheckpointError(f"{e}{hint}") from None
    finally:
        ckpt.close()


def load_for_inference(workdir: str, mesh=None, step: Optional[int] = None):
    """``(cfg, params, tokenizer)`` from a training work dir (checkpoint ``step``, default the
    latest) or from a ``t5x-lite export`` directory, with the parameters restored straight into
    the sharding the config's rules give on ``mesh`` (default: all devices)."""
    return open_for_inference(workdir, mesh, step)[:3]


def open_for_inference(workdir: str, mesh=None, step: Optional[int] = None):
    """``load_for_inference``'s ``(cfg, params, tokenizer)`` and the step read: the checkpoint's,
    or the one an export was written from (None for an export that does not say)."""
    cfg = read_config(workdir)
    mesh = mesh if mesh is not None else partitioning.make_mesh(cfg)
    target = abstract_param_tree(cfg, mesh)
    export_info = os.path.join(workdir, EXPORT_FILE)
    if os.path.exists(export_info):
        if step is not None:
            raise ConfigError(f"{workdir} is an export of one step; a step cannot be chosen")
        params = _restore_export(workdir, target)
        try:
            with open(export_info, encoding="utf-8") as f:
                step = json.load(f).get("step")
        except (OSError, ValueError, AttributeError):
            step = None
    else:
        step, params = read_params(workdir, cfg, target, step)
    tok = tokenizer_path(cfg, workdir)
    if not os.path.exists(tok):
        raise ConfigError(f"tokenizer {tok} not found")
    return cfg, params, Tokenizer.load(tok), step


def _restore_export(directory: str, target: Any) -> Any:
    path = os.path.abspath(os.path.join(directory, "params"))
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(path, target)
    except Exception as e:
        raise CheckpointError(f"export {directory} cannot be read: {_root_cause(e)}") from e


def export(workdir: str, output: str, dtype: Optional[str] = None, step: Optional[int] = None,
           log: Callable[[str], None] = print) -> dict:
    """Write the parameters of checkpoint ``step`` (default: latest), cast to ``dtype`` if given,
    with the config and tokenizer, as the self-contained directory ``output``. Each process
    reads and writes only its shards; ``output`` appears complete or not at all."""
    if os.path.exists(output):
        raise ConfigError(f"--output {output} already exists; give a new path (an export never overwrites)")
    cfg = read_config(workdir)
    tok = tokenizer_path(cfg, workdir)
    if not os.path.exists(tok):
        raise ConfigError(f"tokenizer {tok} not found")
    step, params = read_params(workdir, cfg, abstract_param_tree(cfg, partitioning.make_mesh(cfg)), step)
    if dtype is not None:
        cast = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p),
                       out_shardings=jax.tree.map(lambda x: x.sharding, params))
        params = cast(params)
        cfg.model.param_dtype = dtype
    cfg.data.tokenizer = None  # the copy beside the params
    num_params = int(sum(x.size for x in jax.tree.leaves(params)))
    info = {"format": "t5x_lite export", "source": os.path.abspath(workdir), "step": int(step),
            "param_dtype": cfg.model.param_dtype, "num_params": num_params}

    partial = os.path.abspath(output) + ".partial"
    if jax.process_index() == 0 and os.path.exists(partial):
        shutil.rmtree(partial)  # left by a killed export
    _sync_processes("t5x_lite_export_start")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(partial, "params"), params)
    if jax.process_index() == 0:
        with open(os.path.join(partial, CONFIG_FILE), "w") as f:
            f.write(cfg.to_yaml())
        shutil.copyfile(tok, os.path.join(partial, TOKENIZER_FILE))
        with open(os.path.join(partial, EXPORT_FILE), "w") as f:
            json.dump(info, f, indent=2)
        os.replace(partial, output)
    _sync_processes("t5x_lite_export_done")
    log(f"exported step {step} of {workdir}: {num_params:,} parameters ({cfg.model.param_dtype}) -> {output}")
    return info


def run_export_cli(args) -> int:
    """``t5x-lite export --workdir DIR --output PATH [--dtype bfloat16] [--step N]``."""
    export(args.workdir, args.output, dtype=args.dtype, step=args.step)
    return 0
