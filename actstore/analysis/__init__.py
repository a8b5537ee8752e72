"""Density analyses of stored layers (issue 4, in progress).

Built so far: ``rows`` (the study's sample mask; exact duplicates dropped keeping order), ``neighbours``
(exact kNN in the precomputed form DADApy takes) and ``density`` (per-layer ID, density, ADP clusters,
ARI and label overlap with DADApy fed those neighbours), each checked against scikit-learn and DADApy.
``layers`` caches neighbour graphs and results in the run's ``derived`` group, ``scheduler`` runs one Dask
task per (run, layer), ``compare`` holds run comparisons and the density-peak dendrogram. Still to come:
jobs over gRPC, the client's ``analyze``, the ``analyze`` CLI, and kNN on CUDA.
"""
