#!/usr/bin/env bash
# Train (and/or evaluate) on GPUs, in the foreground, from the repo root.
#
# Single node: one process drives every visible GPU; no distributed flags.
# Multi-node (or several processes per node): run this on every process with
# the same --coordinator_address and --num_processes and its own --process_id
# (0 .. N-1); they go to bayesncl_jax.main, which calls
# jax.distributed.initialize with them. Process 0's host must listen on
# the coordinator port. With --eval, only process 0 evaluates afterwards
# (bayesncl_jax.evaluate takes only --workdir and uses its local GPUs).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME --config=CONFIG --workdir=DIR [--config.FIELD=VALUE ...]
         [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]
         [--eval | --eval_only] [--gpus=0,1,...] [--mem_fraction=0.9]
         [--nccl_socket_ifname=IFACE] [--python=python3] [--dry-run]

  --config               config file with its argument, e.g.
                         configs/cifar10.py:method=bayesncl
  --workdir              checkpoints and metrics (local path or gs://); on
                         several nodes it must be shared by all of them
  --config.FIELD=VALUE   overrides, passed to main verbatim (repeatable)
  --coordinator_address  HOST:PORT of process 0 \\
  --num_processes        total number of processes  } multi-process only:
  --process_id           this process, 0 .. N-1    /  all three or none
  --eval                 after training, evaluate (process 0 only)
  --eval_only            only evaluate --workdir (--config not needed)
  --gpus                 CUDA_VISIBLE_DEVICES for this process (default: all)
  --mem_fraction         XLA_PYTHON_CLIENT_MEM_FRACTION (default: \$XLA_PYTHON_CLIENT_MEM_FRACTION or 0.9)
  --nccl_socket_ifname   NCCL_SOCKET_IFNAME: the network interface NCCL uses
                         between nodes (e.g. eth0, ib0), when it picks a wrong one
  --python               interpreter with bayesncl_jax installed (default: python3)
  --dry-run              print the command instead of running it
EOF
}

CONFIG="" WORKDIR="" EVAL=0 EVAL_ONLY=0 GPUS="" PYTHON="python3"
COORDINATOR_ADDRESS="" NUM_PROCESSES="" PROCESS_ID="" NCCL_SOCKET_IFNAME=""
MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
parse_flags "config workdir coordinator_address num_processes process_id gpus mem_fraction nccl_socket_ifname python config.*" \
  "eval eval_only" "$@"
require_flags workdir python mem_fraction
if [[ $EVAL_ONLY == 1 ]]; then
  [[ $EVAL == 0 ]] || die "--eval and --eval_only are exclusive"
  [[ -z $CONFIG && ${#CONFIG_OVERRIDES[@]} == 0 ]] ||
    die "--eval_only runs bayesncl_jax.evaluate --workdir only: drop --config and --config.*"
else
  require_flags config
fi

distributed=()
if [[ -n $COORDINATOR_ADDRESS$NUM_PROCESSES$PROCESS_ID ]]; then
  require_flags coordinator_address num_processes process_id
  [[ $COORDINATOR_ADDRESS =~ ^[^:[:space:]]+:[0-9]+$ ]] ||
    die "--coordinator_address=$COORDINATOR_ADDRESS: expected HOST:PORT"
  [[ $NUM_PROCESSES =~ ^[1-9][0-9]*$ ]] ||
    die "--num_processes=$NUM_PROCESSES: expected a positive integer"
  if ! [[ $PROCESS_ID =~ ^(0|[1-9][0-9]*)$ ]] || ((PROCESS_ID >= NUM_PROCESSES)); then
    die "--process_id=$PROCESS_ID: expected an integer in [0, $NUM_PROCESSES)"
  fi
  distributed=("--coordinator_address=$COORDINATOR_ADDRESS"
    "--num_processes=$NUM_PROCESSES" "--process_id=$PROCESS_ID")
fi
[[ $MEM_FRACTION =~ ^(0?\.[0-9]*[1-9][0-9]*|1(\.0*)?)$ ]] ||
  die "--mem_fraction=$MEM_FRACTION: expected a number in (0, 1]"
[[ -z $GPUS || $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] ||
  die "--gpus=$GPUS: expected a comma-separated list of GPU indices, e.g. 0,1"
require_cmd "$PYTHON"

# The environment, set on the command line so that --dry-run shows it:
# - XLA_PYTHON_CLIENT_MEM_FRACTION: JAX reserves this share of each GPU's
#   memory up front (default 0.75). This process is the GPUs' only user, so
#   give the batch most of it, leaving 10% for what is allocated outside
#   XLA's pool (CUDA context, cuDNN/cuBLAS workspaces, NCCL buffers).
# - NCCL_DEBUG=WARN (unless already set): when a collective fails, NCCL says
#   why in the log instead of leaving an opaque XLA error.
# - CUDA_VISIBLE_DEVICES, NCCL_SOCKET_IFNAME: only when asked for.
env=(env "XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION"
  "NCCL_DEBUG=${NCCL_DEBUG:-WARN}")
[[ -z $GPUS ]] || env+=("CUDA_VISIBLE_DEVICES=$GPUS")
[[ -z $NCCL_SOCKET_IFNAME ]] || env+=("NCCL_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME")

# Signals: a supervisor, a scheduler or a user may signal this wrapper's pid
# only. The last command is exec'd (Python takes this pid and gets every
# signal itself); a command followed by another (training before --eval)
# runs as a child that gets SIGTERM for any SIGTERM, SIGHUP or SIGINT sent
# here, and is waited for: it saves its checkpoint and exits 143, and so
# does this script, without evaluating. No Python process is left behind.
main_cmd=() eval_cmd=()
if [[ $EVAL_ONLY == 0 ]]; then
  main_cmd=("${env[@]}" "$PYTHON" -m bayesncl_jax.main "--config=$CONFIG"
    "--workdir=$WORKDIR" ${distributed[@]+"${distributed[@]}"}
    ${CONFIG_OVERRIDES[@]+"${CONFIG_OVERRIDES[@]}"})
fi
if [[ ($EVAL == 1 || $EVAL_ONLY == 1) && ${PROCESS_ID:-0} == 0 ]]; then
  eval_cmd=("${env[@]}" "$PYTHON" -m bayesncl_jax.evaluate "--workdir=$WORKDIR")
fi
if [[ ${#main_cmd[@]} != 0 && ${#eval_cmd[@]} != 0 ]]; then
  run_forwarding "${main_cmd[@]}"
  run_exec "${eval_cmd[@]}"
elif [[ ${#main_cmd[@]} != 0 ]]; then
  run_exec "${main_cmd[@]}"
elif [[ ${#eval_cmd[@]} != 0 ]]; then
  run_exec "${eval_cmd[@]}"
fi
