"""How the command line's --help shows its options: flags as flags (typer's rich help gave every one a type)."""

from __future__ import annotations

from typer.core import TyperCommand, TyperGroup


class _PlainFlags:
    """typer's rich help prints a value type beside every option, flags and --help included ("--yes <bool>"), as if a
    flag took a value; an empty metavar leaves a flag's type column blank."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False):
                param.metavar = ""
        return params


class PlainFlagsCommand(_PlainFlags, TyperCommand):
    """A command whose flags show as flags in --help."""


class PlainFlagsGroup(_PlainFlags, TyperGroup):
    """The command group, its --help shown as a flag too."""
