"""The verifier's forward cost per token count against the bytes it reads and the FLOPs it does,
for each dtype, as the markdown that docs/bench.md shows ("CPU verify cost").

Each dtype runs `specheads calibrate` (the CPU-linears choice and the cost measured again, stored
when the machine was quiet); run it on a quiet machine, e.g.

    python scripts/verify_cost_table.py --threads 2 --output verify_cost_table.md
    python scripts/verify_cost_table.py --sizes 1,2 --dtypes float32   # a quick check

Tables whose measurement was refused (busy machine, unsettled timings) say so in their title.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verifier", default="smollm2-135m", help="as for specheads calibrate (default: %(default)s)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma list (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="(default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--sizes", default=",".join(map(str, range(1, 65))), help="token counts (default: 1 to 64)")
    p.add_argument("--max-seconds", type=float, default=300.0, help="time cap per dtype (default: %(default)s)")
    p.add_argument("--output", default=None, help="markdown file to write (default: stdout)")
    args = p.parse_args(argv)

    from specheads.cli import build_parser, run_calibrate
    from specheads.errors import SpecHeadsError

    parts = []
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        cal = ["calibrate", "--verifier", args.verifier, "--dtype", dtype, "--device", args.device,
               "--sizes", args.sizes, "--max-seconds", str(args.max_seconds)]
        if args.threads:
            cal += ["--threads", str(args.threads)]
        try:
            result = run_calibrate(build_parser().parse_args(cal))
        except SpecHeadsError as exc:
            print(f"verify_cost_table: error: {exc}", file=sys.stderr)
            return 2
        parts.append(f"**{dtype}**: {result['title']}\n\n{result['markdown']}\n")
    text = "\n".join(parts)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
        print(f"written: {args.output}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
