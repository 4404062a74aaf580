"""clara_ray: CLaRa-style joint retriever–generator training on Ray.

Documents are compressed once into memory-token vectors; a query reasoner and
a generator work in the same continuous space, and a differentiable top-k lets
the generator's next-token loss train retrieval.
"""

__version__ = "0.1.0"
