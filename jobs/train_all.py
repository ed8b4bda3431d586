"""Train and compare all (architecture × mode) runs on Ray: ``ray job submit --working-dir . -- python jobs/train_all.py --config configs/celeba_seed.yaml``."""

import sys

from genderrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-all", *sys.argv[1:]]))
