"""`flowdiff` commands for timeseries (registered on flowdiff.cli.app and its handler lists)."""
