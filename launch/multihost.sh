#!/usr/bin/env bash
# Several hosts, no scheduler: run this on every host (ssh, pdsh, tmux...), changing only
# HOST_INDEX. Host 0 runs the coordinator; every host must reach COORDINATOR's port.
#
#   # on host 0 (10.0.0.1):
#   COORDINATOR=10.0.0.1:12355 NUM_HOSTS=2 HOST_INDEX=0 launch/multihost.sh -- \
#       t5x-lite train --config configs/llama_1b.yaml --workdir /shared/runs/llama_1b \
#       --set mesh.data=2 --set mesh.fsdp=8
#   # on host 1: the same line with HOST_INDEX=1
#
# PROCS_PER_HOST (default 1): processes on each host. 1 = one process drives all the host's
# GPUs; 8 on an 8-GPU host = one process per GPU. Process ids: HOST_INDEX*PROCS_PER_HOST + k.
# The processes of a host are started by launch/local.sh (logs in LOGDIR/process_K.log, all of
# the host's processes stopped when one fails). Processes on other hosts notice a dead host
# through JAX's heartbeat (about 100 s) and stop. The work dir must be on a file system every
# host sees: every process writes its shards of each checkpoint.
set -euo pipefail

: "${COORDINATOR:?set COORDINATOR=HOST:PORT of host 0 (an address every host can reach)}"
: "${NUM_HOSTS:?set NUM_HOSTS to the number of hosts}"
: "${HOST_INDEX:?set HOST_INDEX to 0..NUM_HOSTS-1 (0 on the coordinator host)}"
PROCS_PER_HOST=${PROCS_PER_HOST:-1}
if ! (( 0 <= HOST_INDEX && HOST_INDEX < NUM_HOSTS )); then
  echo "multihost.sh: HOST_INDEX=$HOST_INDEX must be in 0..$(( NUM_HOSTS - 1 ))" >&2
  exit 2
fi

export COORDINATOR
export FIRST_PROCESS=$(( HOST_INDEX * PROCS_PER_HOST ))
export TOTAL_PROCESSES=$(( NUM_HOSTS * PROCS_PER_HOST ))
export LOGDIR=${LOGDIR:-launch_logs/host_$HOST_INDEX}
exec "$(dirname "$0")/local.sh" "$PROCS_PER_HOST" "$@"
