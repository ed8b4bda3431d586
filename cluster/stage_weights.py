"""Pre-stage every backbone's Keras ImageNet weights in ``$KERAS_HOME/models`` (run where there is internet).

The image build runs this, so that ``weights: imagenet`` on a cluster without egress finds the files in the cache
instead of downloading them; Keras checks each file's hash when it downloads it. GoogLeNet has no official Keras
ImageNet weights and is skipped (give it a weights file or ``none``).
"""

import os
from pathlib import Path

from genderrec import models


def main() -> None:
    for name, architecture in models.REGISTRY.items():
        if architecture.has_imagenet_weights:
            models.build_backbone(name, (64, 64, 3), "imagenet")
    cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
    for path in sorted(cache.iterdir()):
        print(f"{path}  {path.stat().st_size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
