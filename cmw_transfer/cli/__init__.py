"""The ``cmw-transfer`` command: one click group, subcommands imported only when used.

Conventions for every subcommand: bad input -> one ``error: ...`` line on stderr and exit 2; an unexpected
failure -> traceback and exit 1; outputs are written atomically (temp file + rename).
"""

from __future__ import annotations

import importlib
import sys
import traceback
import warnings

import click

from cmw_transfer.cli.text import printable
from cmw_transfer.errors import UserError, is_environment_error

SUBCOMMANDS = {
    "inspect": ("cmw_transfer.cli.inspect_cmd", "inspect_cmd", "Show a weighting net: config, centers, curves."),
    "push": ("cmw_transfer.cli.push_cmd", "push_cmd", "Upload a saved net to the Hugging Face Hub."),
    "data": ("cmw_transfer.cli.data_cmd", "data_cmd", "Describe a dataset spec: counts, families, noise."),
    "metatrain": ("cmw_transfer.cli.metatrain_cmd", "metatrain_cmd", "Meta-train a weighting net on a biased source."),
    "apply": ("cmw_transfer.cli.apply_cmd", "apply_cmd", "Train a classifier with a frozen weighting net."),
    "import": ("cmw_transfer.cli.import_cmd", "import_cmd", "Convert the authors' released net to an artifact."),
    "probe": ("cmw_transfer.cli.probe_cmd", "probe_cmd", "Record every sample's loss curve (CurveNet's probe)."),
}


class LazyGroup(click.Group):
    """Keeps ``--help`` fast: a subcommand's module (and torch) is imported only when it runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in SUBCOMMANDS:
            return None
        module, attr, _ = SUBCOMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, SUBCOMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cmw-transfer", message="%(prog)s %(version)s")
def cli() -> None:
    """Meta-train a sample-weighting net once, deploy it anywhere."""


def _fail(message: str, code: int) -> None:
    first = printable(" ".join(str(message).split())) or "unknown error"
    click.echo(f"error: {first}", err=True)
    sys.exit(code)


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {printable(' '.join(str(message).split()))}", err=True)


def main(argv: list[str] | None = None) -> None:
    warnings.showwarning = _warning_line
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)  # torch.func internals
    try:
        rc = cli.main(args=argv, prog_name="cmw-transfer", standalone_mode=False)
    except UserError as exc:
        _fail(str(exc), 2)
    except click.exceptions.NoArgsIsHelpError as exc:  # bare ``cmw-transfer``: the help, as ``--help`` prints it
        click.echo(exc.ctx.get_help() if exc.ctx else cli.get_help(click.Context(cli, info_name="cmw-transfer")))
        sys.exit(0)
    except click.exceptions.UsageError as exc:
        hint = f" (see {exc.ctx.command_path} --help)" if exc.ctx else ""
        _fail(exc.format_message() + hint, 2)
    except click.exceptions.ClickException as exc:  # e.g. click.FileError
        _fail(exc.format_message(), 2)
    except click.exceptions.Abort as exc:  # click turns Ctrl-C / SIGTERM (KeyboardInterrupt) into Abort
        _fail("interrupted" if isinstance(exc.__cause__, KeyboardInterrupt) else "aborted", 130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except OSError as exc:
        if not is_environment_error(exc):
            traceback.print_exc()
            _fail(f"unexpected failure ({exc.__class__.__name__}: {exc}); this is a bug, please report it", 1)
        _fail(f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc), 2)
    except SystemExit:
        raise
    except BaseException as exc:
        traceback.print_exc()
        _fail(f"unexpected failure ({exc.__class__.__name__}: {exc}); this is a bug, please report it", 1)
    sys.exit(rc if isinstance(rc, int) else 0)
