"""megatron-patch: patch-level training (Shao, Meng, Zhou 2024) on Megatron-Core.

Submodules import megatron.core; this package root stays import-light.
"""

__version__ = "0.1.0"
