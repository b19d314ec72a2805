"""The base of every error caused by the user's input; the CLI prints these without a traceback."""


class CompressError(Exception):
    """Bad recipe, missing path, incompatible models, existing output, diverged run, ..."""
