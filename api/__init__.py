"""autopar's user-facing surfaces: the `autopar` command line and the HTTP planning service."""
