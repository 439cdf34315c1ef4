"""The command line: the parser (``parser.py``), the entry point (``main.py``) and one module of ``cmd_*``
handlers per area. Only this package imports argparse; the handlers turn flags into the library's typed calls
and its results into text."""

from dromo_ray.cli.main import Terminated, main

__all__ = ["Terminated", "main"]
