"""Sub-commands of the `flashdino` CLI (see engine/cli.py)."""
