"""Retrieval kernels: BM25 (numba), exact dense search (torch/numpy), faiss indexes, ranking metrics.

A library like `model/`: numpy arrays (and torch tensors / faiss indexes) in and out, nothing about
artifacts, manifests, stages or the pipeline's config. Heavy dependencies (numba, torch, faiss) are
imported by the submodule that needs them, never here.
"""
