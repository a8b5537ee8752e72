"""Ingest: run a transformers model over a question set and write its hidden states to the store."""
