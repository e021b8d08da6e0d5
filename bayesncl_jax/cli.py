"""Shared command-line conveniences of the entry points.

`run(main)` replaces `app.run(main)`: errors a user can fix (a bad config
field, missing data, a corrupt checkpoint, a full disk, a read-only folder,
...) end in one short paragraph on stderr — what is wrong, how to fix it —
and exit status 2, instead of a traceback. `--verbose` (or the environment
variable BAYESNCL_VERBOSE=1) shows the traceback as well.

`enable_compilation_cache()` is the one place where every command (main,
evaluate, explore, reproduce, the tests) switches on JAX's persistent
compilation cache: a second run of the same program loads the compiled step
from disk instead of compiling it again. Where it lives is one setting —
`--compilation_cache` (every command), else `$BAYESNCL_COMPILATION_CACHE`,
else `$JAX_COMPILATION_CACHE_DIR`, else `paths.user_cache_dir()` +
`/jax_compilation_cache` — local or gs://; '' (or "none") turns it off.
"""
from __future__ import annotations

import difflib
import errno
import logging as py_logging
import os
import re
import sys
import textwrap
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
from absl import logging

# Exit status of every entry point (README "Exit status"):
EXIT_OK = 0
EXIT_INTERNAL_ERROR = 1   # a bug: the traceback is printed
EXIT_USER_ERROR = 2       # usage or config error, bad path, corrupt input
EXIT_DATA_MISSING = 3     # a dataset split is not where the config says
EXIT_LOCKED = 4           # another process holds the workdir's lock
EXIT_PREEMPTED = 143      # SIGTERM: checkpoint saved; re-run to resume
VERBOSE_ENV = "BAYESNCL_VERBOSE"
COMPILATION_CACHE_ENV = "BAYESNCL_COMPILATION_CACHE"
COMPILATION_CACHE_SUBDIR = "jax_compilation_cache"
_OFF = ("", "none", "off")
_HINT = f"(--verbose or {VERBOSE_ENV}=1 shows the traceback.)"


def verbose() -> bool:
  """--verbose on the command line or BAYESNCL_VERBOSE=1 in the env."""
  if os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes"):
    return True
  if "verbose" in flags.FLAGS and flags.FLAGS.is_parsed():
    return bool(flags.FLAGS.verbose)
  return "--verbose" in sys.argv


class _QuietLibraries(py_logging.Filter):
  """Keeps the console readable.

  Drops INFO chatter of Orbax/Grain/TFDS (their warnings still show) and
  JAX's probe of absent accelerators ("Unable to initialize backend 'tpu'"
  on a CPU or GPU machine); Orbax logs each failed background write with a
  full traceback: the one-line message stays, the traceback only with
  --verbose.
  """
  _NOISY = ("/orbax/", "/grain/", "/tensorflow_datasets/", "/etils/")

  def filter(self, record):
    if (record.levelno < py_logging.WARNING
        and "Unable to initialize backend" in str(record.msg)):
      return False
    noisy = any(part in record.pathname for part in self._NOISY)
    if noisy and record.exc_info and "/orbax/" in record.pathname \
        and not verbose():
      record.exc_info, record.exc_text = None, None
    return record.levelno >= py_logging.WARNING or not noisy


def quiet_library_logs() -> None:
  """Keeps the console readable (progress bar, our own logs) at INFO."""
  if logging.get_verbosity() <= logging.INFO:
    logging.get_absl_handler().addFilter(_QuietLibraries())


def _quiet_excepthook(previous):
  """After a failed asynchronous save, TensorStore's completion callbacks
  reach Orbax's closed event loop and each prints a traceback ("Event loop
  is closed"); the failure itself is reported once, by the caller."""
  def hook(kind, value, tb):
    if (issubclass(kind, RuntimeError) and "Event loop is closed" in
        str(value) and not verbose()):
      return
    previous(kind, value, tb)
  return hook


# ----------------------------------------------------------------------------
# JAX's persistent compilation cache.
# ----------------------------------------------------------------------------
def compilation_cache_dir(value: str | None = None) -> str | None:
  """Where the compilation cache lives; None when it is turned off.

  value: the --compilation_cache flag (None: not given). Then, in order,
  $BAYESNCL_COMPILATION_CACHE, $JAX_COMPILATION_CACHE_DIR (JAX's own
  variable, kept for those who set it), and the default
  `<paths.user_cache_dir()>/jax_compilation_cache`. '', "none" or "off"
  turn the cache off. Local paths are made absolute (a child process with
  another working directory then shares them).
  """
  from bayesncl_jax import paths  # pylint: disable=g-import-not-at-top
  for candidate in (value, os.environ.get(COMPILATION_CACHE_ENV),
                    os.environ.get("JAX_COMPILATION_CACHE_DIR")):
    if candidate is not None:
      break
  else:
    candidate = os.path.join(paths.user_cache_dir(), COMPILATION_CACHE_SUBDIR)
  if candidate.strip().lower() in _OFF:
    return None
  return candidate if paths.is_remote(candidate) else os.path.abspath(
      os.path.expanduser(candidate))


def _probe_writable(path: str) -> None:
  """Creates the folder and writes (then removes) a small file in it."""
  from bayesncl_jax import paths  # pylint: disable=g-import-not-at-top
  paths.ensure_dir(path)
  probe = paths.join(path, f".write_probe.{os.getpid()}")
  paths.write_bytes(probe, b"")
  paths.as_path(probe).unlink()


def enable_compilation_cache(value: str | None = None) -> str | None:
  """Points JAX's persistent compilation cache at `compilation_cache_dir`.

  Call before the first compilation. Returns the folder, or None when the
  cache is off — turned off by the setting, or because the folder cannot be
  created or written: then one warning says so and the run goes on
  uncached (JAX itself would warn at every compiled program).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  path = compilation_cache_dir(value)
  if path is not None:
    try:
      _probe_writable(path)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning(
          "The compilation cache %s cannot be written (%s: %s); this run "
          "compiles without it. Point --compilation_cache (or $%s) at a "
          "writable folder, or set it to '' to turn the cache off.", path,
          type(e).__name__, e, COMPILATION_CACHE_ENV)
      path = None
  if path == jax.config.jax_compilation_cache_dir:
    return path
  # A cache JAX already opened in this process (tests, notebooks) is
  # closed first, so the new setting takes effect.
  compilation_cache.reset_cache()
  jax.config.update("jax_compilation_cache_dir", path)
  if path is not None:
    logging.info("JAX persistent compilation cache: %s", path)
  return path


# ----------------------------------------------------------------------------
# Errors -> one paragraph.
# ----------------------------------------------------------------------------
# The project's own errors, by name: a module run as a program (`python -m
# bayesncl_jax.evaluate`) defines its classes a second time, as __main__.X.
PROJECT_ERRORS = frozenset({
    "ConfigError", "DatasetNotFoundError", "CheckpointError", "DiskFullError",
    "NonFiniteLossError", "EvaluationError", "PreflightError",
    "ConfigChangedError", "WorkdirLockedError", "PathError", "ExploreError"})


def exit_code(e: BaseException) -> int:
  """The exit status of a user error `e` (see the table above)."""
  names = {cls.__name__ for cls in type(e).__mro__}
  if "WorkdirLockedError" in names:
    return EXIT_LOCKED
  if "DatasetNotFoundError" in names:
    return EXIT_DATA_MISSING
  return EXIT_USER_ERROR


def is_project_error(e: BaseException) -> bool:
  return any(cls.__name__ in PROJECT_ERRORS and (
      cls.__module__ == "__main__" or cls.__module__.startswith("bayesncl_jax"))
             for cls in type(e).__mro__)


def explain(e: BaseException) -> str | None:
  """One paragraph for an error the user can fix; None for a bug."""
  from bayesncl_jax import integrity  # pylint: disable=g-import-not-at-top
  if isinstance(e, integrity.DiskFullError):
    return e.strerror
  if is_project_error(e):
    return str(e)
  if integrity.is_disk_full(e):
    where = getattr(e, "filename", None)
    note = ""
    if where:
      note = integrity.space_note(os.path.dirname(os.fspath(where)) or ".")
    return ("The disk is full (no space left on the device"
            + (f" while writing {where}" if where else "") + f").{note} "
            "Free space "
            "on it and re-run the same command: training resumes from its "
            "newest checkpoint.")
  if not isinstance(e, OSError):
    return None
  name = e.filename or "a file"
  if isinstance(e, PermissionError) or e.errno in (errno.EACCES, errno.EPERM,
                                                   errno.EROFS):
    return (f"Cannot access {name}: {e.strerror}. Make it writable (or "
            "readable), or choose another path (--workdir, --out_dir, "
            "--config.dataset.data_dir).")
  if isinstance(e, FileNotFoundError):
    if e.filename is None:
      return str(e)
    return (f"No such file or directory: {name}. Check the path (--workdir, "
            "--config, --config.dataset.data_dir).")
  if isinstance(e, (NotADirectoryError, IsADirectoryError)):
    return f"{e.strerror}: {name}. Check the path."
  return None


def _fail(message: str | None, e: BaseException):
  if message is None or verbose():
    raise e
  # "error: " is an indent, not a word: a long first word (a path) then
  # stays on the first line instead of leaving "error:" alone on it.
  text = "\n".join(
      textwrap.fill(p, 79, break_long_words=False, break_on_hyphens=False,
                    initial_indent="error: " if i == 0 else "")
      if len(p) > 79 and not p.startswith("  ")
      else ("error: " if i == 0 else "") + p
      for i, p in enumerate(message.split("\n")))
  print(f"{text}\n{_HINT}", file=sys.stderr, flush=True)
  sys.exit(exit_code(e))


# ----------------------------------------------------------------------------
# Config flags: a missing file, unknown fields.
# ----------------------------------------------------------------------------
def _flag_value(argv: Sequence[str], name: str) -> str | None:
  for i, arg in enumerate(argv):
    m = re.match(rf"^--?{name}(=(.*))?$", arg)
    if m:
      if m.group(1) is not None:
        return m.group(2)
      return argv[i + 1] if i + 1 < len(argv) else None
  return None


def _split_spec(spec: str) -> tuple[str, str | None]:
  path, _, arg = spec.partition(":")
  return path, (arg or None)


def _missing_config_file(argv, config_flag: str) -> str | None:
  spec = _flag_value(argv, config_flag)
  if not spec:
    return None
  path, _ = _split_spec(spec)
  if os.path.exists(path):
    return None
  folder = os.path.dirname(path) or "."
  if not os.path.isdir(folder):
    folder = "configs"
  known = sorted(f for f in os.listdir(folder) if f.endswith(".py")
                 and not f.startswith("_")) if os.path.isdir(folder) else []
  choices = (f" Config files in {folder}/: {', '.join(known)}." if known
             else "")
  return (f"Config file {path!r} not found (paths are relative to "
          f"{os.getcwd()}).{choices} Example: "
          f"--{config_flag}=configs/fashion_mnist.py:method=ncl")


def config_fields(config) -> list[str]:
  """Every dotted field path of a ConfigDict (leaves and sub-configs)."""
  out = []
  for key, value in config.items():
    out.append(key)
    if hasattr(value, "items") and not isinstance(value, dict):
      out += [f"{key}.{sub}" for sub in config_fields(value)]
  return out


def suggest_fields(field: str, fields: Sequence[str], n: int = 3
                   ) -> list[str]:
  """Closest known fields to an unknown `field` (same last name first)."""
  last = field.rsplit(".", 1)[-1]
  same_name = [f for f in fields if f.rsplit(".", 1)[-1] == last]
  close = difflib.get_close_matches(field, fields, n=n, cutoff=0.8)
  by_last: dict[str, list[str]] = {}
  for f in fields:
    by_last.setdefault(f.rsplit(".", 1)[-1], []).append(f)
  close_last = [f for x in difflib.get_close_matches(last, list(by_last), n=n,
                                                     cutoff=0.75)
                for f in by_last[x]]
  return list(dict.fromkeys(same_name + close + close_last))[:n]


def _unknown_overrides(argv, config_flag: str) -> str | None:
  spec = _flag_value(argv, config_flag)
  if not spec:
    return None
  from bayesncl_jax import config_lib  # pylint: disable=g-import-not-at-top
  path, arg = _split_spec(spec)
  try:
    config = config_lib.load_file(path, arg)
  except config_lib.ConfigError as e:
    return str(e)
  except Exception:  # pylint: disable=broad-except
    return None
  fields = config_fields(config)
  problems = []
  for a in argv:
    m = re.match(rf"^--?(?:no)?{config_flag}\.([^=]+)", a)
    if not m or m.group(1) in fields:
      continue
    field = m.group(1)
    hints = suggest_fields(field, fields)
    hint = (" (did you mean " + " or ".join(f"{config_flag}.{h}"
                                            for h in hints) + "?)"
            if hints else "")
    problems.append(f"--{config_flag}.{field}{hint}")
  if not problems:
    return None
  return (f"Unknown config field(s): {'; '.join(problems)}. The fields are "
          f"defined in bayesncl_jax/config_lib.py (base_config) and {path}.")


def _parse_flags(argv, config_flag: str | None):
  if config_flag:
    message = _missing_config_file(argv, config_flag)
    if message:
      _fail(message, FileNotFoundError(message))
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # A bad value (--config.optim.total_steps=abc) or an error raised by the
    # config file itself (configs/x.py:foo=1): ours if we can say more.
    message = _unknown_overrides(argv, config_flag) if config_flag else None
    if message is None:
      # A bad flag value is a usage error (exit 2), not a crash.
      message = (f"{e}. Pass --helpshort or --helpfull to see help on "
                 "flags.")
    _fail(message, e)
  except Exception as e:  # pylint: disable=broad-except
    # Unknown --config.* fields surface as AttributeError/KeyError.
    message = (_unknown_overrides(argv, config_flag) if config_flag
               else None) or explain(e)
    _fail(message, e)


# ----------------------------------------------------------------------------
# Entry point.
# ----------------------------------------------------------------------------
def run(main: Callable[[list[str]], Any], *,
        config_flag: str | None = None) -> None:
  """`app.run(main)` with user errors as messages (exit 2), not tracebacks.

  config_flag: the name of the ml_collections config flag, if any: a
  missing config file and unknown `--config.*` fields are reported with
  the closest field names.
  """
  sys.excepthook = _quiet_excepthook(sys.excepthook)
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, "Show the traceback of errors "
                      f"(also: {VERBOSE_ENV}=1).")
  if "compilation_cache" not in flags.FLAGS:
    flags.DEFINE_string(
        "compilation_cache", None, "JAX persistent compilation cache folder "
        f"(local or gs://; '' = off). Default: ${COMPILATION_CACHE_ENV}, "
        "else ~/.cache/bayesncl_jax/jax_compilation_cache (beside "
        "$BAYESNCL_CACHE_DIR's data caches).")

  def guarded(argv):
    try:
      enable_compilation_cache(flags.FLAGS.compilation_cache)
      return main(argv)
    except (app.UsageError, SystemExit, KeyboardInterrupt):
      raise
    except Exception as e:  # pylint: disable=broad-except
      _fail(explain(e), e)

  app.run(guarded, flags_parser=lambda argv: _parse_flags(argv, config_flag))
