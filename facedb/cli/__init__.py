"""The ``facedb`` command line: a thin layer where each command calls one FaceDB method.

Output is a readable table by default; ``--json`` prints one JSON object per line. ``--db`` and ``--json`` are
accepted before or after the command's name. Errors print one line on stderr, with no traceback (and no
locals: probes are biometric data).

Exit status: **0** success (or "yes"), **1** a negative answer (``verify``: the claim is rejected; ``check``:
problems found), **2** an error (bad input or usage, missing database, a photo that could not be used: in
``search``, ``detect`` and ``enroll`` the other photos are still done first), **3** an internal error (a bug:
the traceback is printed), 130 interrupted, 141 the reader of stdout went away (``| head``; quietly). The same
convention as ``grep``.

Heavy modules (faiss, torch) are imported inside commands so that ``facedb --help`` is instant. Commands live
in one module per area (people, photos, admin, evaluation); a new interface area adds a module and imports it
at the bottom of this file.
"""

from __future__ import annotations

import errno
import functools
import inspect
import json
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import click
import typer

try:  # typer 0.29 carries its own copy of click, and raises its exception classes
    from typer._click import exceptions as _click_exceptions
except ImportError:  # pragma: no cover - typer with click as a dependency
    from click import exceptions as _click_exceptions

from ..errors import FaceDBError, InvalidInputError

#: The --weights option of every command that embeds photos.
WeightsOpt = Annotated[Path | None, typer.Option(envvar="FACEDB_WEIGHTS", help="Weights file: FaceNet's (.pt), or "
                                                  "sface's (.onnx; only the published file is accepted).")]


if TYPE_CHECKING:
    from ..db import FaceDB

app = typer.Typer(
    help="facedb: a face-recognition identity database. Scores are cosine similarities (higher = more alike). "
         "Exit status: 0 ok / yes, 1 a negative answer (verify: no; check: problems), 2 an error (including a "
         "photo that could not be used), 3 an internal error, 130 interrupted.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

F = TypeVar("F", bound=Callable[..., Any])

#: Exit status of an error (FaceDBError, or a usage error from click).
EXIT_ERROR = 2
#: Exit status of a negative answer.
EXIT_NO = 1
#: Exit status of an internal error (a bug in facedb): never 1, which means "no".
EXIT_BUG = 3
#: Exit status when whoever reads stdout stopped reading (``facedb people | head -2``): 128 + SIGPIPE, what a
#: shell reports for a command a broken pipe ended, and never a "no" (1) or an error (2). Nothing is printed.
EXIT_PIPE = 141


def _stdout_gone() -> typer.Exit:
    """The exit for a broken pipe, after pointing stdout at devnull so that the interpreter's last flush does
    not fail again (the recipe in Python's ``signal`` documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file (a test runner's buffer)
        pass
    return typer.Exit(EXIT_PIPE)


class State:
    def __init__(self, db: Path, json_out: bool, quiet: bool = False, read_only: bool = False,
                 key_file: Path | None = None, key_command: str | None = None) -> None:
        self.db = db
        self.json = json_out
        self.quiet = quiet
        self.read_only = read_only
        self.key_file = key_file
        self.key_command = key_command

    def key(self) -> Any:
        """The key-encryption key's source: --key-file, --key-command, else $FACEDB_KEY (None if unset)."""
        from ..protection.keyring import KeySource

        return KeySource.from_options(self.key_file, self.key_command)


KeyFileOpt = Annotated[Path | None, typer.Option("--key-file", envvar="FACEDB_KEY_FILE", show_default=False,
                                                 help="Encrypted databases: file holding the key (else $FACEDB_KEY).")]
KeyCommandOpt = Annotated[str | None, typer.Option("--key-command", envvar="FACEDB_KEY_COMMAND", show_default=False,
                                                   help="Encrypted databases: command that prints the key.")]


@app.callback()
def _main(
    ctx: typer.Context,
    db: Annotated[
        Path, typer.Option("--db", envvar="FACEDB_DB", help="Database directory.", show_default=True)
    ] = Path("facedb-data"),
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per line, for scripts.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress reports on stderr.")] = False,
    read_only: Annotated[bool, typer.Option(
        "--read-only", envvar="FACEDB_READ_ONLY",
        help="Open the database read-only: nothing in the gallery changes and a shared index engine is never "
             "written to (a read replica's copy of the store; decisions still go to its audit trail).")] = False,
    key_file: KeyFileOpt = None,
    key_command: KeyCommandOpt = None,
) -> None:
    ctx.obj = State(db, json_out, quiet, read_only, key_file, key_command)


# Options every command also accepts after its name (`facedb search x.jpg --json --db D`), as sqlite-utils
# and llm users expect; given there, they override the ones before the command.
_LOCAL = [
    inspect.Parameter("_db_after", inspect.Parameter.KEYWORD_ONLY, default=None,
                      annotation=Annotated[Path | None, typer.Option("--db", help="Database directory.",
                                                                     show_default=False)]),
    inspect.Parameter("_json_after", inspect.Parameter.KEYWORD_ONLY, default=False,
                      annotation=Annotated[bool, typer.Option("--json", help="One JSON object per line.")]),
    inspect.Parameter("_quiet_after", inspect.Parameter.KEYWORD_ONLY, default=False,
                      annotation=Annotated[bool, typer.Option("--quiet", "-q", help="No progress reports.")]),
    inspect.Parameter("_key_file_after", inspect.Parameter.KEYWORD_ONLY, default=None,
                      annotation=Annotated[Path | None, typer.Option("--key-file", show_default=False,
                                                                     help="File holding the key.")]),
    inspect.Parameter("_key_command_after", inspect.Parameter.KEYWORD_ONLY, default=None,
                      annotation=Annotated[str | None, typer.Option("--key-command", show_default=False,
                                                                    help="Command that prints the key.")]),
]


def command(*args: Any, group: typer.Typer | None = None, **kwargs: Any) -> Callable[[F], F]:
    """``app.command`` (or ``group.command``) that accepts ``--db``/``--json``/``--quiet`` after the command's
    name and turns FaceDBError into one line on stderr and exit status 2."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*a: Any, _db_after: Path | None = None, _json_after: bool = False, _quiet_after: bool = False,
                    _key_file_after: Path | None = None, _key_command_after: str | None = None, **kw: Any) -> Any:
            ctx = kw.get("ctx") or next((x for x in a if isinstance(x, typer.Context)), None)
            root = ctx.find_root() if ctx is not None else None
            if root is not None and root.obj is not None:
                if _db_after is not None:
                    root.obj.db = _db_after
                if _key_file_after is not None or _key_command_after is not None:
                    root.obj.key_file, root.obj.key_command = _key_file_after, _key_command_after
                root.obj.json = root.obj.json or _json_after
                root.obj.quiet = root.obj.quiet or _quiet_after
            try:
                return fn(*a, **kw)
            except FaceDBError as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(EXIT_ERROR) from None
            except OSError as exc:  # the environment: disk full, permission denied, a file gone meanwhile
                if exc.errno == errno.EPIPE:  # the reader of our output went away: not an error to report
                    raise _stdout_gone() from None
                typer.echo(f"error: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", err=True)
                raise typer.Exit(EXIT_ERROR) from None
            except KeyboardInterrupt:
                typer.echo("interrupted", err=True)
                raise typer.Exit(130) from None
            except (typer.Exit, typer.Abort, click.exceptions.ClickException):
                raise
            except Exception:  # a bug: its traceback (no locals) for the report, and never the status of a "no"
                traceback.print_exc(file=sys.stderr)
                typer.echo("error: an internal error in facedb (please report it with the traceback above)", err=True)
                raise typer.Exit(EXIT_BUG) from None

        sig = inspect.signature(fn, eval_str=True)
        wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *_LOCAL])  # type: ignore[attr-defined]
        (group or app).command(*args, **kwargs)(wrapper)
        return fn

    return decorate


def state(ctx: typer.Context) -> State:
    return ctx.find_root().obj  # type: ignore[no-any-return]


def open_db(ctx: typer.Context, weights: Path | None = None, readonly: bool = False) -> FaceDB:
    from ..db import FaceDB
    from ..operations.audit import default_actor

    st = state(ctx)
    return FaceDB.open(st.db, weights=weights, readonly=readonly or st.read_only, actor=default_actor("cli"),
                       key=st.key())


def emit(ctx: typer.Context, rows: Iterable[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    """JSON lines with --json, else an aligned table of ``columns``."""
    rows = list(rows)
    if state(ctx).json:
        for row in rows:
            typer.echo(json.dumps(row, ensure_ascii=False, default=str))
        return
    if not rows:
        return
    columns = list(columns or rows[0].keys())

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4f}"
        if isinstance(v, (dict, list)):
            return json.dumps(v, ensure_ascii=False)
        return str(v)

    table = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(columns)]
    typer.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for t in table:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(t, widths)).rstrip())


#: Decimals thresholds and margins are shown with: cosine similarities, where 1e-6 is far below any measured
#: difference, and the float noise of a computed value (0.9363130000000001) is hidden. Stored values keep theirs.
SHOWN_DECIMALS = 6


def _tidy(obj: Any, key: str = "") -> Any:
    """``obj`` with every float under a key naming a threshold or margin rounded to SHOWN_DECIMALS (only those:
    a rate such as a FAR of 1e-7 must not become 0)."""
    if isinstance(obj, dict):
        return {k: _tidy(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_tidy(v, key) for v in obj]
    if isinstance(obj, float) and ("threshold" in key or "margin" in key):
        return round(obj, SHOWN_DECIMALS)
    return obj


def emit_kv(ctx: typer.Context, obj: dict[str, Any]) -> None:
    """``obj`` as one JSON line with --json, else aligned ``key  value`` lines; thresholds rounded (_tidy)."""
    obj = _tidy(obj)
    if state(ctx).json:
        typer.echo(json.dumps(obj, ensure_ascii=False, default=str))
        return
    width = max(len(k) for k in obj)
    for k, v in obj.items():
        shown = json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else ("-" if v is None else v)
        typer.echo(f"{k.ljust(width)}  {shown}")


def parse_meta(pairs: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInputError(f"--meta takes key=value, got {pair!r}")
        if key in out and out[key] != value:  # which one was meant? refuse rather than keep the last
            raise InvalidInputError(f"--meta gives {key!r} twice ({out[key]!r} and {value!r})")
        out[key] = value
    return out


#: Seconds between two progress lines when stderr is not a terminal.
PROGRESS_EVERY = 5.0


class Progress:
    """Progress on stderr: a bar on a terminal; when stderr is not a terminal (a log file, a pipe), one plain
    line every :data:`PROGRESS_EVERY` seconds (``enrolling: 480/2000 photos, 5.1/s``), so long jobs are not
    silent; nothing with --quiet."""

    def __init__(self, ctx: typer.Context, label: str, total: int | None = None, unit: str = "photo",
                 every: float | None = None) -> None:
        import time

        self._time = time.monotonic
        self.label, self.total, self.unit = label, total, unit
        self.every = PROGRESS_EVERY if every is None else every
        self.quiet = state(ctx).quiet
        self.tty = sys.stderr.isatty()
        self._bar: Any = None
        self._start = self._last = self._time()
        self.done = 0
        if not self.quiet and self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=unit, desc=label, file=sys.stderr, leave=False)

    def __call__(self, done: int) -> None:
        self.done = done
        if self._bar is not None:
            self._bar.update(done - self._bar.n)
        elif not self.quiet and not self.tty and self._time() - self._last >= self.every:
            self._last = self._time()
            rate = done / max(self._last - self._start, 1e-9)
            of = f"/{self.total}" if self.total else ""
            typer.echo(f"{self.label}: {done}{of} {self._units(self.total or done)}, {rate:.1f}/s", err=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif not self.quiet and not self.tty and self.done:
            elapsed = self._time() - self._start
            typer.echo(f"{self.label}: {self.done} {self._units(self.done)} done in {elapsed:.0f} s", err=True)

    def _units(self, n: int) -> str:
        return self.unit if n == 1 else f"{self.unit}s"

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stdout_is_devnull() -> bool:
    try:
        out, null = os.fstat(sys.stdout.fileno()), os.stat(os.devnull)
    except (OSError, ValueError):
        return False
    return (out.st_dev, out.st_ino) == (null.st_dev, null.st_ino)


def _usage_error(exc: Any) -> SystemExit:
    """A usage error (a bad option value, an unknown option or command) as one line on stderr, exit 2, instead
    of typer's boxed panel: the same shape as every other error. ``facedb`` alone still prints its help."""
    if type(exc).__name__ == "NoArgsIsHelpError":
        click.echo(exc.format_message())
        return SystemExit(exc.exit_code)
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    click.echo(f"error: {message}{hint}", err=True)
    return SystemExit(exc.exit_code)


def _warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """Warnings as one line on stderr (``warning: ...``): Python's own format names the CLI's source line (typer's
    ``return callback(**use_params)``), which says nothing to someone at a terminal."""
    click.echo(f"warning: {message}", err=True)


def main() -> None:
    was_devnull = _stdout_is_devnull()
    warnings.showwarning = _warning_line
    try:
        rv = app(standalone_mode=False)
        raise SystemExit(rv if isinstance(rv, int) else 0)
    except _click_exceptions.ClickException as exc:
        raise _usage_error(exc) from None
    except typer.Abort:  # Ctrl-D at a prompt
        click.echo("interrupted", err=True)
        raise SystemExit(130) from None
    except BrokenPipeError:  # `facedb people | head`, outside a command
        raise SystemExit(_stdout_gone().exit_code) from None
    except SystemExit as exc:
        # click and rich turn a broken pipe outside a command (`facedb --help | true`) into exit 1, our "no";
        # click marks it by wrapping stdout in PacifyFlushWrapper, rich by pointing stdout at devnull
        if exc.code == EXIT_NO and (isinstance(sys.stdout, click.utils.PacifyFlushWrapper)
                                    or (_stdout_is_devnull() and not was_devnull)):
            raise SystemExit(EXIT_PIPE) from None
        raise

from . import admin, cluster, evaluation, people, photos, protect, service  # noqa: E402,F401  (the commands register themselves)

if __name__ == "__main__":
    main()
