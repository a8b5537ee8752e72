"""actstore: store, serve and analyse the hidden states of language models, layer by layer."""

__version__ = "0.1.0"
