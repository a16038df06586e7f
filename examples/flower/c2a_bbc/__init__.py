"""A Flower app that federates C2A on the packaged MiniLM and BBC News (see ../README.md)."""
