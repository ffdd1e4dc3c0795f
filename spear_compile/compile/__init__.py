"""The compiler: the ``spear`` backend, the pass manager and its passes, per-compile records, ``optimize``,
``inspect`` and ``debug``."""
