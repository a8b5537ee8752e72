"""actstore.server: see the open issues."""
