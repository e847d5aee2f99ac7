"""Private implementation modules of modeconn; the public names live in ``modeconn/__init__.py``."""
