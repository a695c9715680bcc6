"""``python -m kubeplane``: the same as the ``kubeplane`` command."""

import sys

from kubeplane import cli

sys.exit(cli.main())
