"""``python -m genderrec`` is the ``genderrec`` command."""

import sys

from genderrec.cli import main

sys.exit(main())
