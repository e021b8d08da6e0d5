#!/usr/bin/env bash
# shellcheck shell=bash
# Helpers shared by every launch/*.sh script; sourced, never executed.
#
# Flags are `--name=value` (or `--name` for booleans); `--some_name` and
# `--some-name` are the same flag. A script declares its flags with
# `parse_flags "<value flags>" "<boolean flags>" "$@"`, which sets the shell
# variable SOME_NAME for --some_name (the script initialises it first, with its
# default). `config.*` in the value flags collects every `--config.X=Y` into
# the CONFIG_OVERRIDES array, passed through to bayesncl_jax.main verbatim.
#
# Every external command goes through `run`: it prints the command, quoted so
# that it can be pasted into a shell, as `+ CMD` (on stdout under --dry-run,
# where nothing is executed; on stderr otherwise, then executes it).
#
# Portable to bash 3.2 (macOS's /bin/bash): no associative arrays, no
# namerefs, no ${x^^}, and empty arrays expanded as ${a[@]+"${a[@]}"}.

SCRIPT_NAME=$(basename "$0")
DRY_RUN=0
CONFIG_OVERRIDES=()

# die MESSAGE: print "<script>: error: MESSAGE" on stderr and exit 2.
die() {
  printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2
  exit 2
}

# shq ARG...: the arguments quoted for a POSIX shell, space-separated, on
# stdout. Arguments made only of safe characters are left bare; the others are
# double-quoted when that is literal (no " $ ` \ !), else single-quoted (a '
# inside becomes '\''). In `--flag=value` and `NAME=value` only the value is
# quoted, which reads better: --command='ls -l'.
shq() {
  local out="" arg key sq="'" esc="'\\''"
  for arg in "$@"; do
    key=""
    case $arg in
      '') arg="''" ;;
      *[!A-Za-z0-9_./:=@%+,-]*)
        if [[ $arg =~ ^(--?)?[A-Za-z_][A-Za-z0-9_.-]*= ]]; then
          key=${BASH_REMATCH[0]}
          arg=${arg#"$key"}
        fi
        case $arg in
          *[\"\$\`\\!]*) arg="$key'${arg//$sq/$esc}'" ;;
          *) arg="$key\"$arg\"" ;; # nests better in '...' than '\''.
        esac
        ;;
    esac
    out="${out:+$out }$arg"
  done
  printf '%s' "$out"
}

# remote_path PATH: PATH as a word for the remote shell; a leading ~/ becomes
# "$HOME"/ so that it is expanded on the worker (a quoted ~ would not be).
remote_path() {
  # shellcheck disable=SC2088  # a literal ~, matched, not expanded.
  case $1 in
    '~/'*)
      # shellcheck disable=SC2016  # $HOME must reach the remote shell as is.
      printf '"$HOME"/%s' "$(shq "${1#\~/}")"
      ;;
    *) shq "$1" ;;
  esac
}

# run CMD ARG...: print the command line, then execute it unless --dry-run.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s\n' "$(shq "$@")"
    return 0
  fi
  printf '+ %s\n' "$(shq "$@")" >&2
  "$@"
}

# run_exec CMD ARG...: `run`, but CMD replaces this shell (same pid), so that
# a signal sent to the script reaches CMD. Under --dry-run only prints.
run_exec() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s\n' "$(shq "$@")"
    return 0
  fi
  printf '+ %s\n' "$(shq "$@")" >&2
  exec "$@"
}

# run_forwarding CMD ARG...: `run`, with CMD as a child that receives SIGTERM
# whenever this shell gets SIGTERM, SIGHUP or SIGINT; returns CMD's status
# once CMD has exited (a signal interrupts `wait`, so wait again). A
# background child of a non-interactive shell ignores SIGINT, hence TERM.
run_forwarding() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s\n' "$(shq "$@")"
    return 0
  fi
  printf '+ %s\n' "$(shq "$@")" >&2
  local status interrupted
  "$@" &
  FORWARD_PID=$!
  trap 'interrupted=1; kill -TERM "$FORWARD_PID" 2>/dev/null || :' TERM HUP INT
  while :; do
    interrupted=0 status=0
    wait "$FORWARD_PID" || status=$?
    [[ $interrupted == 1 ]] || break
  done
  trap - TERM HUP INT
  return "$status"
}

# upper NAME: NAME in upper case (bash 3.2 has no ${x^^}).
upper() {
  printf '%s' "$1" | tr '[:lower:]' '[:upper:]'
}

# parse_flags "VALUE_FLAGS" "BOOLEAN_FLAGS" ARG...: see the header.
# -h/--help calls the script's `usage` and exits 0; --dry-run is always known.
parse_flags() {
  local value_flags=" $1 " bool_flags=" $2 dry_run " arg name value
  shift 2
  for arg in "$@"; do
    case $arg in
      -h | --help)
        usage
        exit 0
        ;;
      --config.*)
        [[ $value_flags == *" config.* "* ]] ||
          die "unknown flag: ${arg%%=*} (see --help)"
        [[ $arg == *=* ]] || die "${arg} needs a value: ${arg}=VALUE"
        CONFIG_OVERRIDES+=("$arg")
        continue
        ;;
      --?*) ;;
      *) die "unexpected argument: '$arg' (flags are --name=value; see --help)" ;;
    esac
    name=${arg#--}
    name=${name%%=*}
    name=${name//-/_}
    if [[ $name == *[!a-z0-9_]* ]]; then
      die "unknown flag: --$name (see --help)"
    elif [[ $value_flags == *" $name "* ]]; then
      [[ $arg == *=* ]] || die "--$name needs a value: --$name=VALUE"
      value=${arg#*=}
    elif [[ $bool_flags == *" $name "* ]]; then
      [[ $arg != *=* ]] || die "--$name is a switch and takes no value"
      value=1
    else
      die "unknown flag: --$name (see --help)"
    fi
    printf -v "$(upper "$name")" '%s' "$value"
  done
}

# require_flags NAME...: die naming every one of the flags left empty.
require_flags() {
  local name var missing=""
  for name in "$@"; do
    var=$(upper "$name")
    [[ -n ${!var:-} ]] || missing="$missing --$name"
  done
  [[ -z $missing ]] || die "missing required flag(s):$missing (see --help)"
}

# require_cmd CMD: die unless CMD is on PATH (not checked under --dry-run).
require_cmd() {
  [[ $DRY_RUN == 1 ]] || command -v "$1" >/dev/null ||
    die "'$1' not found on PATH (use --dry-run to only print the commands)"
}

# --- Cloud TPU: every tpu_*.sh script takes --name, --zone and --project. ---

# join_steps STEP...: the shell command lines joined with "; ".
join_steps() {
  local out="" step
  for step in "$@"; do
    out="${out:+$out; }$step"
  done
  printf '%s' "$out"
}

# tpu_scope_flags: the gcloud flags that locate the TPU, in TPU_SCOPE.
tpu_scope_flags() {
  TPU_SCOPE=("--zone=$ZONE")
  [[ -z $PROJECT ]] || TPU_SCOPE+=("--project=$PROJECT")
}

# tpu_ssh_all COMMAND: run the shell command line COMMAND on every worker of
# the TPU VM NAME at once (gcloud runs the workers' ssh sessions in parallel).
tpu_ssh_all() {
  tpu_scope_flags
  # shellcheck disable=SC2153  # NAME is the script's --name.
  run gcloud compute tpus tpu-vm ssh "$NAME" "${TPU_SCOPE[@]}" --worker=all \
    --command="$1"
}

# Defaults shared by tpu_setup.sh, tpu_train.sh and tpu_kill.sh (the same
# paths on every worker; ~ is the ssh user's home there, see remote_path).
# shellcheck disable=SC2034,SC2088  # used by the scripts; ~ stays literal.
{
  DEFAULT_REPO_DIR='~/bayesncl_jax'
  DEFAULT_VENV='~/bayesncl_venv'
  DEFAULT_LOG_DIR='~/bayesncl_logs'
}

# queued_state: the state of the queued resource NAME (ACTIVE, PROVISIONING,
# WAITING_FOR_RESOURCES, SUSPENDED, FAILED, ...), or NOT_FOUND.
queued_state() {
  tpu_scope_flags
  gcloud compute tpus queued-resources describe "$NAME" "${TPU_SCOPE[@]}" \
    --format='value(state.state)' 2>/dev/null || echo NOT_FOUND
}

# wait_queued_active TIMEOUT POLL: wait until the queued resource NAME is
# ACTIVE (its TPU VM exists and can be set up); die if it FAILED, was
# SUSPENDED or TIMEOUT seconds pass (0: no limit). Under --dry-run the state
# query is printed once, as it would be polled every POLL seconds.
wait_queued_active() {
  local timeout=$1 poll=$2 start=$SECONDS state
  tpu_scope_flags
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s\n' "$(shq gcloud compute tpus queued-resources describe \
      "$NAME" "${TPU_SCOPE[@]}" --format='value(state.state)')"
    return 0
  fi
  while :; do
    state=$(queued_state)
    case $state in
      ACTIVE)
        printf '%s: queued resource %s is ACTIVE\n' "$SCRIPT_NAME" "$NAME" >&2
        return 0
        ;;
      FAILED | SUSPENDED | SUSPENDING | NOT_FOUND)
        die "queued resource $NAME is $state: see gcloud compute tpus queued-resources describe $NAME ${TPU_SCOPE[*]}"
        ;;
    esac
    if ((timeout > 0 && SECONDS - start >= timeout)); then
      die "queued resource $NAME still $state after ${timeout}s"
    fi
    printf '%s: queued resource %s is %s; waiting %ss\n' "$SCRIPT_NAME" "$NAME" "$state" "$poll" >&2
    sleep "$poll"
  done
}
