"""The Tinker front end: the ``tinker`` SDK's HTTP protocol over the same
operations, runs and checkpoints as the native ``/v1`` API (``docs/tinker.md``)."""
