"""``python -m recserve.server ...``: the same as ``recserve serve ...``."""

import argparse
import sys

from recserve.cli.serve import add_server_arguments, run

parser = argparse.ArgumentParser(prog="python -m recserve.server")
add_server_arguments(parser)
sys.exit(run(parser.parse_args()))
