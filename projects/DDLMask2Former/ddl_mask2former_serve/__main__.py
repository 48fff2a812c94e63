"""``python -m ddl_mask2former_serve``: the ``ddl-mask2former`` command."""
import sys

from .cli import main

sys.exit(main())
