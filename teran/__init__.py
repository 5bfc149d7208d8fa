"""TERAN cross-modal matching: model library.

Torch is imported only by the modules that need it (model, training, evaluation, feature
extraction). `teran.alignment_numpy`, `teran.tokenization`, `teran.preprocess` and
`teran.errors` are torch-free so the serving packages can use them.
"""

__version__ = "0.1.0"
