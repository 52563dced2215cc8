"""`flowdiff` commands for trajectories (registered on flowdiff.cli.app and its handler lists)."""
