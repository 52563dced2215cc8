"""`flowdiff` commands for pde (registered on flowdiff.cli.app and its handler lists)."""
