"""`python -m universal_neurons ...` is the `universal-neurons` command."""

import sys

from .cli.main import main

sys.exit(main())
