"""Thin adapters that add the robustness regulariser to SSL frameworks.

Installed as ``robust_reg.integrations``. Each adapter imports its framework
lazily, so ``import robust_reg`` never needs lightly or solo-learn.
"""
