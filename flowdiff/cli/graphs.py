"""`flowdiff` commands for graphs (registered on flowdiff.cli.app and its handler lists)."""
