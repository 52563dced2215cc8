"""`flowdiff` commands for quant (registered on flowdiff.cli.app and its handler lists)."""
