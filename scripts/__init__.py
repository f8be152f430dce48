"""Command-line tools beside the two main scripts; run them from the repository root as
``python -m scripts.<name>`` (or as files once the project is installed with ``pip install -e .``)."""
