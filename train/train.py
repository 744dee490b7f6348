"""Train a drafter from a recipe. Run it under accelerate:

    accelerate launch train/train.py --recipe recipes/smollm2_medusa1_quick.yaml
    accelerate launch --config_file recipes/accelerate/ddp.yaml train/train.py --recipe ... --resume

`python train/train.py --help` lists the options (the same as `specheads train`).
"""

import sys

from specheads.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
