#!/usr/bin/env bash
# Run NUM_PROCESSES processes of one command on this host, joined by jax.distributed.
#
#   launch/local.sh NUM_PROCESSES -- t5x-lite train --config configs/decoder_tiny.yaml --workdir runs/x
#
# GPUs: process K sees only its own GPUs through CUDA_VISIBLE_DEVICES (one each when
#   NUM_PROCESSES equals the GPU count; NUM_PROCESSES must divide it). XLA_FLAGS gets the flags of
#   t5x_lite/xla_flags.py first (overlapped collectives ...), the caller's own after them.
# No GPU: CPU processes with T5X_LITE_CPU_DEVICES fake devices each (default 1) and gloo
#   collectives between them: the same multi-process program, testable on a laptop.
#
# The coordinator (process 0) listens on a free loopback port (or $PORT). Each process writes
# LOGDIR/process_K.log (default LOGDIR: launch_logs/<date>-<pid>); the first one's output is
# also shown here. When one process fails, the others are stopped (SIGTERM, then SIGKILL after
# $GRACE_S seconds, default 10) and this script exits with the first failure's exit code.
# SIGTERM to this script is passed on to every process (preemption: they save and exit 0).
# launch/multihost.sh runs this on each of several hosts, setting COORDINATOR (host 0's
# address), FIRST_PROCESS (this host's first process id) and TOTAL_PROCESSES (all hosts').
set -uo pipefail

usage() {
  echo "usage: $0 NUM_PROCESSES -- COMMAND [ARGS...]" >&2
  echo "  env: LOGDIR, PORT, GRACE_S, T5X_LITE_CPU_DEVICES (CPU hosts), T5X_LITE_INIT_TIMEOUT," >&2
  echo "       T5X_LITE_XLA_GPU_FLAGS=0 (GPU hosts: XLA_FLAGS as given), PYTHON (default python3)," >&2
  echo "       COORDINATOR, FIRST_PROCESS, TOTAL_PROCESSES (set by multihost.sh)" >&2
  exit 2
}

[[ $# -ge 1 && $1 =~ ^[1-9][0-9]*$ ]] || usage
NUM=$1
shift
[[ ${1:-} == "--" ]] && shift
[[ $# -ge 1 ]] || usage

gpu_list() {  # the GPUs this host offers: CUDA_VISIBLE_DEVICES if set (empty: none), else nvidia-smi's
  if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
    tr ',' ' ' <<<"$CUDA_VISIBLE_DEVICES"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | tr '\n' ' '
  fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

GPUS=($(gpu_list))
if (( ${#GPUS[@]} > 0 )); then
  if (( ${#GPUS[@]} % NUM )); then
    echo "local.sh: $NUM processes cannot share ${#GPUS[@]} GPUs (${GPUS[*]}) evenly; use a divisor of ${#GPUS[@]}" >&2
    exit 2
  fi
  PER=$(( ${#GPUS[@]} / NUM ))
  MODE="$NUM processes x $PER GPU(s)"
  # the XLA flags for training on GPUs (t5x_lite/xla_flags.py), then the user's: the last setting of a
  # flag wins, so XLA_FLAGS given here override them; T5X_LITE_XLA_GPU_FLAGS=0 leaves XLA_FLAGS alone
  if [[ ${T5X_LITE_XLA_GPU_FLAGS:-1} != 0 ]]; then
    gpu_flags=$(${PYTHON:-python3} -m t5x_lite.xla_flags) || {
      echo "local.sh: cannot read t5x_lite's XLA flags (${PYTHON:-python3} -m t5x_lite.xla_flags); set PYTHON" >&2; exit 2; }
    export XLA_FLAGS="$gpu_flags${XLA_FLAGS:+ $XLA_FLAGS}"
    echo "local.sh: XLA_FLAGS=$XLA_FLAGS" >&2
  fi
else
  export JAX_PLATFORMS=cpu
  export T5X_LITE_CPU_DEVICES=${T5X_LITE_CPU_DEVICES:-1}
  MODE="$NUM CPU processes x $T5X_LITE_CPU_DEVICES fake device(s), gloo collectives"
fi

LOGDIR=${LOGDIR:-launch_logs/$(date +%Y%m%d-%H%M%S)-$$}
mkdir -p "$LOGDIR"
FIRST=${FIRST_PROCESS:-0}
export T5X_LITE_COORDINATOR=${COORDINATOR:-127.0.0.1:${PORT:-$(free_port)}}
export T5X_LITE_NUM_PROCESSES=${TOTAL_PROCESSES:-$NUM}
export PYTHONUNBUFFERED=1
echo "local.sh: $MODE (processes $FIRST..$(( FIRST + NUM - 1 )) of $T5X_LITE_NUM_PROCESSES)," \
     "coordinator $T5X_LITE_COORDINATOR, logs in $LOGDIR/process_K.log" >&2

declare -A RANK_OF=()  # pid -> process id
PIDS=()
for (( k = 0; k < NUM; k++ )); do
  rank=$(( FIRST + k ))
  (
    export T5X_LITE_PROCESS_ID=$rank
    if (( ${#GPUS[@]} > 0 )); then
      export CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${GPUS[*]:k*PER:PER}")
    fi
    if (( k == 0 )); then
      exec "$@" > >(tee "$LOGDIR/process_$rank.log") 2>&1
    else
      exec "$@" >"$LOGDIR/process_$rank.log" 2>&1
    fi
  ) &
  PIDS+=($!)
  RANK_OF[$!]=$rank
done

stop_all() {  # SIGTERM every process still running, SIGKILL what is left after GRACE_S
  local pid deadline=$(( SECONDS + ${GRACE_S:-10} ))
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do
    while kill -0 "$pid" 2>/dev/null && (( SECONDS < deadline )); do sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null
  done
  wait 2>/dev/null
}

# Ctrl-C: stop everything now. SIGTERM (a scheduler's preemption notice): pass it on and keep
# waiting; the processes agree on a step, save it and exit 0, and so does this script. The
# scheduler's own deadline, not this script, decides when to kill what is left.
trap 'echo "local.sh: interrupted; stopping all processes" >&2; stop_all; exit 130' INT
on_term() {
  echo "local.sh: SIGTERM; passing it on: the processes stop after a common step and save it" >&2
  local pid
  for pid in "${LIVE[@]}"; do kill -TERM "$pid" 2>/dev/null; done
}
trap on_term TERM

LIVE=("${PIDS[@]}")
while (( ${#LIVE[@]} > 0 )); do
  unset done_pid
  wait -n -p done_pid "${LIVE[@]}" 2>/dev/null  # (hides bash's "Killed" job notice)
  rc=$?
  [[ -n ${done_pid:-} ]] || continue
  LIVE=($(printf '%s\n' "${LIVE[@]}" | grep -vx "$done_pid"))
  if (( rc != 0 )); then
    k=${RANK_OF[$done_pid]}
    echo "local.sh: process $k (pid $done_pid) exited with code $rc; stopping the others. Its log ($LOGDIR/process_$k.log) ends:" >&2
    tail -n 20 "$LOGDIR/process_$k.log" | sed 's/^/    /' >&2
    stop_all
    exit "$rc"
  fi
done
echo "local.sh: all $NUM processes finished" >&2
