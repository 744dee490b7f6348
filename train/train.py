"""Train a drafter from a recipe. Run it under accelerate:

    accelerate launch train/train.py --recipe recipes/smollm2_medusa1_quick.yaml
    accelerate launch --config_file recipes/accelerate/ddp.yaml train/train.py --recipe ... --resume

`python train/train.py --help` lists the options (the same as `specheads train`). A recipe for a
hub model runs end to end on a random scaled-down twin of its verifier, on a CPU, in seconds:

    python train/train.py --recipe recipes/qwen3-8b_eagle3.yaml --tiny-twin
"""

import sys

from specheads.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
