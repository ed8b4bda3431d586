"""Label images with the selected model on Ray Data: ``ray job submit --working-dir . -- python jobs/label.py --model s3://models/gender/ --input manifest.parquet --output out/``."""

import sys

from genderrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
