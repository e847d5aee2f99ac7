"""The ``modeconn`` command line (typer + rich): thin wrappers over the library."""
