"""``python -m hiera_fast``: the ``hiera-fast`` command."""

import sys

from .cli import main

sys.exit(main())
