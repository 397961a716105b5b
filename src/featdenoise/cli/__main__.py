"""``python -m featdenoise.cli ...``: the same as the ``featdenoise`` command."""

import sys

from featdenoise.cli.app import main

sys.exit(main())
