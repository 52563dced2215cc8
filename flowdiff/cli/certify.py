"""`flowdiff` commands for certify (registered on flowdiff.cli.app and its handler lists)."""
