"""The study's analysis of a model, end to end (``actstore study``), and its figures (``actstore plot``).

``job`` ingests a model on MMLU under several methods, serves the store on a local port and drives the
analyses through the client, as a remote user would; ``stored`` reads the same results back from a
store; ``report`` writes them out (CSV tables, ``summary.md``) and ``figures`` draws them.
"""
