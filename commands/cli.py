# The commands' command lines. Those that take train.py's overrides (plan, tune): key=value overrides, and the flags
# every command has: --help, and --debug (a traceback instead of one line on bad input). Those with arguments of
# their own (prepare, export, sbatch): argparse, whose mistakes are one line too.
import argparse
import sys

from launcher.errors import fail


def overrides_and_debug(argv: list[str] | None, prog: str, description: str) -> tuple[list[str], bool]:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(f"usage: {prog} [--debug] [key=value ...]\n\n{description}\n\n"
              "The overrides are train.py's (python train.py --help lists the groups); --debug shows a traceback "
              "instead of one line on bad input.")  # fmt: skip
        raise SystemExit(0)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    if bad := [a for a in args if a.startswith("-")]:
        fail(f"unknown option {bad[0]}: {prog} takes key=value overrides and --debug (see {prog} --help)")
    return args, debug


class Parser(argparse.ArgumentParser):
    # argparse reports a bad argument as its usage and then the error, over two lines: here, one, with exit code 2.
    def error(self, message: str):
        fail(f"{message}: see {self.prog} --help")

    def parse_with_overrides(self, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
        # The command's own options, and train.py's key=value overrides among them; an option it does not know is
        # one line, not an override Hydra would misread.
        opts, overrides = self.parse_known_args(argv)
        if bad := [o for o in overrides if o.startswith("-")]:
            fail(f"unknown option {bad[0]}: see {self.prog} --help")
        return opts, overrides
