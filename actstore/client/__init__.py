"""actstore.client: see the open issues."""
