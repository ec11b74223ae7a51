"""Recipe code behind the ``robust-reg`` command and ``examples/``: data, encoders, augmentations,
the SimCLR/BYOL pretraining loop on the public API (``.training``) and the evaluation pipeline.

Not part of the library's core API; it needs the ``examples`` extra (lightly, torchvision,
mlxtend, scikit-learn). The screening harness with every measured variant lives in
``benchmarks/harness.py``, outside the wheel.
"""
