"""Reference experiments: data, encoders, augmentations and SSL training loops.

Used by the ``robust-reg`` command, ``examples/`` and ``benchmarks/``. This is
recipe code on top of the library, not part of its core API; it needs the
``examples`` extra (lightly, torchvision, mlxtend, scikit-learn).
"""
