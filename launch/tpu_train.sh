#!/usr/bin/env bash
# Start training (and/or evaluation) on EVERY worker of a TPU VM at once.
#
# Each worker runs the same `python -m bayesncl_jax.main` command; on a pod
# slice JAX finds the other workers itself (jax.distributed.initialize()). The
# job runs detached (tmux session, or nohup), so it survives the ssh session,
# and writes LOG_DIR/SESSION-<worker hostname>.log on each worker (copied to
# WORKDIR/logs/ for a gs:// workdir), ending with
# the line "[bayesncl] exited with status N".
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME --name=NAME --zone=ZONE --config=CONFIG --workdir=gs://BUCKET/DIR
         [--config.FIELD=VALUE ...] [--eval | --eval_only] [--project=PROJECT]
         [--detach=tmux|nohup] [--session=NAME] [--allow_local_workdir]
         [--env=NAME,NAME...] [--stage_data=DIR]
         [--repo_dir=$DEFAULT_REPO_DIR] [--venv=$DEFAULT_VENV]
         [--log_dir=$DEFAULT_LOG_DIR] [--dry-run]

  --name                 TPU name
  --zone                 zone of the TPU
  --config               config file relative to the checkout, with its
                         argument: configs/cifar10.py:method=ncl
  --workdir              gs:// directory for checkpoints and metrics, shared
                         by all workers (required)
  --config.FIELD=VALUE   overrides, passed to main verbatim (repeatable)
  --eval                 after training, run bayesncl_jax.evaluate --workdir
  --eval_only            run only the evaluation (--config not needed)
  --project              GCP project (default: gcloud's configured project)
  --detach               tmux (default; attach to watch) or nohup
  --session              tmux session / log file name (default: bayesncl, or
                         bayesncl_eval with --eval_only)
  --allow_local_workdir  accept a path on the VM's disk: single-host VMs only
  --env                  names of environment variables set here to set on
                         every worker too (XLA_FLAGS and LIBTPU_INIT_ARGS go
                         whenever they are set here)
  --stage_data           copy the dataset of --config.dataset.data_dir=gs://...
                         to DIR on every worker's disk first (gcloud storage
                         rsync: a rerun copies only what is missing) and
                         train from there
  --repo_dir, --venv     as given to tpu_setup.sh
  --log_dir              per-worker logs (default: $DEFAULT_LOG_DIR)
  --dry-run              print the gcloud command instead of running it
EOF
}

NAME="" ZONE="" PROJECT="" CONFIG="" WORKDIR="" EVAL=0 EVAL_ONLY=0
DETACH="tmux" SESSION="" ALLOW_LOCAL_WORKDIR=0 ENV="" STAGE_DATA=""
REPO_DIR=$DEFAULT_REPO_DIR VENV=$DEFAULT_VENV LOG_DIR=$DEFAULT_LOG_DIR
parse_flags "name zone project config workdir detach session repo_dir venv log_dir env stage_data config.*" \
  "eval eval_only allow_local_workdir" "$@"
require_flags name zone workdir repo_dir venv log_dir
if [[ $EVAL_ONLY == 1 ]]; then
  [[ $EVAL == 0 ]] || die "--eval and --eval_only are exclusive"
  [[ -z $CONFIG && ${#CONFIG_OVERRIDES[@]} == 0 ]] ||
    die "--eval_only runs bayesncl_jax.evaluate --workdir only: drop --config and --config.*"
  SESSION=${SESSION:-bayesncl_eval}
else
  require_flags config
  SESSION=${SESSION:-bayesncl}
fi
if [[ $WORKDIR != gs://?* && $ALLOW_LOCAL_WORKDIR == 0 ]]; then
  die "--workdir=$WORKDIR is not a gs:// path. On a pod slice every worker
  runs main and they must all read and write the same checkpoints; a local
  path gives each worker its own disk (and is lost with the VM). Use
  --workdir=gs://BUCKET/DIR (the TPU's service account needs write access),
  or --allow_local_workdir on a single-host VM."
fi
[[ $SESSION =~ ^[A-Za-z0-9_.-]+$ ]] || die "--session=$SESSION: use letters, digits, _ . -"
case $DETACH in tmux | nohup) ;; *) die "--detach=$DETACH: expected tmux or nohup" ;; esac
[[ -z $ENV || $ENV =~ ^[A-Za-z_][A-Za-z0-9_]*(,[A-Za-z_][A-Za-z0-9_]*)*$ ]] ||
  die "--env=$ENV: expected variable names separated by commas, e.g. --env=TPU_STDERR_LOG_LEVEL,JAX_TRACEBACK_FILTERING"
# --stage_data: the gs:// data_dir override is replaced by the local copy.
stage_src="" stage_dst=""
if [[ -n $STAGE_DATA ]]; then
  [[ $EVAL_ONLY == 0 ]] || die "--stage_data stages the training data: not with --eval_only"
  kept=()
  for override in ${CONFIG_OVERRIDES[@]+"${CONFIG_OVERRIDES[@]}"}; do
    case $override in
      --config.dataset.data_dir=*) stage_src=${override#*=} ;;
      *) kept+=("$override") ;;
    esac
  done
  [[ $stage_src == gs://?* ]] || die "--stage_data=$STAGE_DATA copies the dataset from the bucket: give --config.dataset.data_dir=gs://BUCKET/DIR too"
  # shellcheck disable=SC2088  # a literal ~/, expanded on the workers.
  [[ $STAGE_DATA == /* || $STAGE_DATA == '~/'* ]] ||
    die "--stage_data=$STAGE_DATA: expected an absolute path or ~/DIR on the workers"
  CONFIG_OVERRIDES=(${kept[@]+"${kept[@]}"})
  stage_dst=$(remote_path "$STAGE_DATA")
fi
require_cmd gcloud

# The environment every worker's job gets: XLA_FLAGS and LIBTPU_INIT_ARGS
# (XLA and libtpu tuning) when set here, and every variable --env names.
forwarded=()
for var in XLA_FLAGS LIBTPU_INIT_ARGS ${ENV//,/ }; do
  if [[ -z ${!var+set} ]]; then
    [[ $var == XLA_FLAGS || $var == LIBTPU_INIT_ARGS ]] ||
      die "--env names $var, which is not set here: export $var=VALUE first"
    continue
  fi
  case " ${forwarded[*]-} " in *" $var="*) continue ;; esac
  forwarded+=("$var=${!var}")
done

# The job, as one POSIX sh command line run on each worker. -u: unbuffered
# output, so that the log file follows the run live.
venv_py="$(remote_path "$VENV")/bin/python -u"
log="$(remote_path "$LOG_DIR")/$SESSION-\"\$(hostname)\".log"
workdir_flag=$(shq "--workdir=$WORKDIR")
train="$venv_py -m bayesncl_jax.main $(shq "--config=$CONFIG") $workdir_flag"
train="$train${CONFIG_OVERRIDES[0]+ $(shq "${CONFIG_OVERRIDES[@]}")}"
if [[ -n $stage_dst ]]; then
  train="mkdir -p $stage_dst && gcloud storage rsync --recursive $(shq "$stage_src") $stage_dst && $train --config.dataset.data_dir=$stage_dst"
fi
evaluate="$venv_py -m bayesncl_jax.evaluate $workdir_flag"
if [[ $EVAL_ONLY == 1 ]]; then
  steps=$evaluate
elif [[ $EVAL == 1 ]]; then
  steps="$train && $evaluate"
else
  steps=$train
fi
# \$? and \$(hostname) are left for the worker's shell to expand.
exports=${forwarded[0]+"export $(shq "${forwarded[@]}") && "}
job="cd $(remote_path "$REPO_DIR") && $exports{ $steps; } >>$log 2>&1; echo \"[bayesncl] exited with status \$?\" >>$log"
# A gs:// workdir also gets each worker's log, as WORKDIR/logs/SESSION-HOST.log:
# copied every minute while the job runs (a preempted worker's disk is
# lost with it) and once more when it ends.
if [[ $WORKDIR == gs://* ]]; then
  log_copy="gcloud storage cp $log $(shq "${WORKDIR%/}/logs/$SESSION-")\"\$(hostname)\".log >/dev/null 2>&1"
  job="(while sleep 60; do $log_copy; done) </dev/null >/dev/null 2>&1 & $job; kill \$! 2>/dev/null; $log_copy || :"
fi

if [[ $DETACH == tmux ]]; then
  # Fails with "duplicate session" while a job of that name still runs.
  start="tmux new-session -d -s $SESSION $(shq "$job")"
else
  start="(nohup sh -c $(shq "$job") >/dev/null 2>&1 </dev/null &)"
fi
log_dir=$(remote_path "$LOG_DIR")
tpu_ssh_all "mkdir -p $log_dir && $start && echo \"\$(hostname): started $SESSION, logs in\" $log_dir"
