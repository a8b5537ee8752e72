"""The study's density analyses of stored layers (docs/explanation/science.md).

``params`` (the study's parameters, and how they fit small runs), ``rows`` (the sample mask; exact
duplicates dropped keeping order), ``neighbours`` (exact kNN, on the GPU when there is one), ``density``
(per-layer ID, density, ADP clusters, ARI, label overlap, with DADApy fed those neighbours), ``compare``
(two runs at a layer; the density-peak dendrogram), ``layers`` (all of it for a stored run, cached in
the run's ``derived`` group), ``scheduler`` (one Dask task per (run, layer) and per compared pair).
Importing this package, or ``params``, alone loads nothing heavy.
"""


class NotAnalysed(LookupError):
    """Asked for stored results only (``compute=False``) and there are none for these parameters."""
