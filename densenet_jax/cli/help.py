"""The help layout every command's parser shares (no data or training imports: ``convert`` runs
without the [train] extra)."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown for options that take a value; not for flags, where ``--no-progress``
    would read "(default: True)", nor for None, which the help words."""

    def _get_help_string(self, action):
        if action.nargs == 0 or action.default is None:  # a flag, or a default the help describes
            return action.help
        return super()._get_help_string(action)
