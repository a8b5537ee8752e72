"""actstore.analysis: see the open issues."""
