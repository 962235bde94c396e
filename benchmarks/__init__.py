"""kinema's benchmarks: one module per measurement, each runnable as a script.

    python benchmarks/<name>.py ...          # from a source checkout
    python -m kinema.benchmarks.<name> ...   # anywhere kinema is installed

Importing this package (or any of its modules) imports no heavy peer: HuggingFace
``transformers`` is imported only when an HF model is built (``hf_peer``). Protocol and
reference numbers: ``docs/benchmarks.md``.
"""
