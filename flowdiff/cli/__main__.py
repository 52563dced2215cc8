"""``python -m flowdiff.cli``: the ``flowdiff`` command."""

from . import main

main()
