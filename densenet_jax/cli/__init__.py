"""The ``densenet-jax`` command: ``train``, ``evaluate``, ``predict``, ``explain``, ``models``,
``convert`` and ``export``, one module each (its options and a ``run(args)`` that calls the library); here the
parser that gathers them, and what every command shares: logging, the compilation cache, and user
errors as one line on stderr."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from types import ModuleType

import jax

from densenet_jax.cli.help import HelpFormatter
from densenet_jax.errors import CheckpointError, DivergedError, Interrupted
from densenet_jax.files import is_disk_full

COMMANDS = ("train", "evaluate", "predict", "explain", "models", "convert", "export")

log = logging.getLogger("densenet_jax")
_HANDLER = logging.StreamHandler()
_HANDLER.setFormatter(logging.Formatter("%(message)s"))


def _command(name: str) -> ModuleType:
    """The module of the command ``name`` (``densenet_jax.cli.<name>``)."""
    # Imported by name when used: train, evaluate and predict import the train extra (grain,
    # Pillow), which a pip user who only converts lacks.
    return importlib.import_module(f"{__name__}.{name}")


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose refusals are one line (``densenet-jax train: error: ...``, exit
    status 2) rather than the whole usage block: ``--help`` shows that."""

    def error(self, message: str):
        """Print ``message`` in one line naming the command, and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    """The ``densenet-jax`` argument parser, with its subcommands."""
    p = Parser(prog="densenet-jax",
                                description="DenseNet in JAX: train, evaluate, predict, explain, models, convert, export.")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = _command(name)
        module.add_options(sub.add_parser(name, help=module.HELP, formatter_class=HelpFormatter))
    return p


def _enable_compilation_cache() -> None:
    """Keep compiled programs on disk so that a second run, or a resumed one, skips compilation.
    DENSENET_JAX_CACHE sets the folder; an empty value turns the cache off."""
    folder = os.environ.get("DENSENET_JAX_CACHE", os.path.expanduser("~/.cache/densenet-jax/xla"))
    if folder:
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line, parsed. ``convert`` is parsed on its own: the other commands' options
    import the training stack (grain, Pillow: the train extra), which a pip user who only converts
    lacks."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["convert"]:
        convert = _command("convert")
        p = Parser(prog="densenet-jax convert", description=convert.HELP, formatter_class=HelpFormatter)
        convert.add_options(p)
        return argparse.Namespace(command="convert", **vars(p.parse_args(argv[1:])))
    return parser().parse_args(argv)


_TRACKER_WARNING = "ignore:resource_tracker:UserWarning"


def _quiet_resource_tracker() -> None:
    """Grain's data workers, when stopped, leave the batches they had made to Python's resource
    tracker, which removes them at exit and warns of "leaked shared_memory objects": nothing is
    lost, yet the warning came after a run's last line. The tracker is a process of its own that
    takes this process's -W options (``sys.warnoptions``) when it starts."""
    if _TRACKER_WARNING not in sys.warnoptions:
        sys.warnoptions.append(_TRACKER_WARNING)


def _log_to_stderr() -> None:
    """The library's progress lines, bare, on today's stderr: main() may run more than once in a
    process (tests, notebooks), so with one handler."""
    _HANDLER.stream = sys.stderr
    if _HANDLER not in log.handlers:
        log.addHandler(_HANDLER)
    log.setLevel(logging.INFO)
    log.propagate = False
    # huggingface_hub prints its warnings through a handler of its own and passes them on to the
    # root logger, to which importing Orbax adds a handler (absl's logging set-up): each was printed
    # twice. Its own handler is enough.
    logging.getLogger("huggingface_hub").propagate = False
    # Orbax logs a full disk from each of its threads, with tracebacks, before raising it; the
    # command's one line says it, with what was kept.
    logging.getLogger("absl").addFilter(_not_disk_full)


def _not_disk_full(record: logging.LogRecord) -> bool:
    return not is_disk_full(record.exc_info[1] if record.exc_info else None) and \
        not is_disk_full(ValueError(record.getMessage()))


def _names_in_any_encoding() -> None:
    """Every path and name the command prints goes out as the bytes it came in as. Python decodes
    a file name that is not valid in the locale's encoding (a Latin-1 name under a UTF-8 locale)
    with surrogate escapes, which a strict stream refuses to print ("surrogates not allowed"); its
    surrogateescape error handler writes the original bytes back, as ``ls`` prints them. Files
    the commands write hold names as JSON, whose escapes keep them too."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")


def main(argv: list[str] | None = None) -> None:
    """Entry point; user errors end in one line on stderr and a non-zero exit status."""
    _names_in_any_encoding()
    args = _parse(argv)
    _enable_compilation_cache()
    _log_to_stderr()
    _quiet_resource_tracker()
    if getattr(args, "precision", None) == "fp64":
        jax.config.update("jax_enable_x64", True)
    try:
        _command(args.command).run(args)
    except Interrupted as e:
        print(f"densenet-jax: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)  # what a shell reports for a command a signal stopped
    except KeyboardInterrupt:
        print("densenet-jax: interrupted", file=sys.stderr)
        sys.exit(130)
    except (CheckpointError, DivergedError, ValueError, FileNotFoundError) as e:
        print(f"densenet-jax: error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        if e.filename is None:
            raise
        # Any other OSError about a path (a user's folder that cannot be made or written), named.
        print(f"densenet-jax: error: {e.filename}: {e.strerror}", file=sys.stderr)
        sys.exit(1)
