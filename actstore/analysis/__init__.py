"""Density analyses of stored layers (issue 4, in progress).

Built so far: ``rows`` (the study's sample mask; exact duplicates dropped keeping order), ``neighbours``
(exact blocked kNN in DADApy's precomputed form) and ``density`` (per-layer ID, density, ADP clusters,
ARI and label overlap with DADApy fed those neighbours), each checked against scikit-learn and DADApy.
Still to come: the neighbour-graph and result caches in the store, Dask scheduling, jobs over gRPC,
comparisons between runs and the dendrogram.
"""
