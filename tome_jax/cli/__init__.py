"""Command lines over the library: each module is argument parsing plus one library call.

`python -m eval.X` and `python -m train.X` from a checkout run the same `main` functions.
"""
