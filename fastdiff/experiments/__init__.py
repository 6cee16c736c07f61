"""Experiments above the library: the post-hoc EMA x guidance grid search (``sweep``) and the guidance
demo on digits (``demo``). They use the library (sampling, training, metrics) as a user would; the
``fastdiff sweep`` and ``fastdiff demo`` commands are thin layers over them."""
