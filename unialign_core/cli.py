"""argparse for our command lines: an unknown option is named even when required arguments are missing too.

Plain argparse checks the required arguments before it looks at what it could not match, so `--bogus` alone gets
"the following arguments are required: ..." and the mistyped flag is never mentioned.
"""

import argparse
import sys

_MISSING = ("the following arguments are required", "one of the arguments")


class ArgumentParser(argparse.ArgumentParser):
    _argv = None

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)
        try:
            return super().parse_known_args(self._argv, namespace)
        finally:
            self._argv = None

    def error(self, message):
        argv, self._argv = self._argv, None  # None: no second look from within the first
        if argv is not None and message.startswith(_MISSING):
            unknown = self.unknown_options(argv)
            if unknown:
                message = f"unrecognized arguments: {' '.join(unknown)} (see {self.prog} --help); also {message}"
        super().error(message)

    def unknown_options(self, args):
        """The option-like arguments no option of this parser takes (parsed again with nothing required)."""
        groups = [*self._actions, *self._mutually_exclusive_groups]
        required = [g.required for g in groups]
        try:
            for g in groups:
                g.required = False
            _, extras = super().parse_known_args(args, argparse.Namespace())
        finally:
            for g, was in zip(groups, required):
                g.required = was
        return [a for a in extras if a.startswith("-") and a != "-"]
