"""Expected failures. Anything raised as `WarpError` is the user's to fix: the CLI prints its message
on one line (it must name the file/tensor/option and say what to do) and exits with status 2."""


class WarpError(Exception):
    """Bad input, bad option, or a refused output path."""
