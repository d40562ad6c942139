"""`florence-vl bench` from a checkout: python benchmarks/bench.py --shapes tiny,base [--json FILE]."""

import sys

from florence_vl_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
