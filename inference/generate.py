"""Generate for one prompt with speculative decoding: `python inference/generate.py --help`."""

import sys

from specheads.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
