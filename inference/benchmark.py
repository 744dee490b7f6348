"""Benchmark speculative decoding against plain decoding: `python inference/benchmark.py --help`."""

import sys

from specheads.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
