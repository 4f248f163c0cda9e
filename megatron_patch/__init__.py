"""megatron-patch: patch-level training (Shao, Meng, Zhou 2024) on Megatron-Core.

Submodules import megatron.core; this package root stays import-light.
"""

__version__ = "0.1.0"

# megatron's one-line notices about optional accelerators (TE, Apex) and deprecations in torch's
# checkpoint API: said once in the README, hidden from every entry point's output
KNOWN_NOTICES = (
    ".*Apex is not installed.*",
    ".*Transformer Engine and Apex are not installed.*",
    ".*full scope is deprecated.*",
    ".*`load_state_dict` is deprecated.*",
    ".*`save_state_dict` is deprecated.*",
    ".*Please use DTensor instead.*",
)


def quiet_known_notices() -> None:
    """Filter ``KNOWN_NOTICES``; call before importing megatron.core (some fire at import)."""
    import warnings

    for message in KNOWN_NOTICES:
        warnings.filterwarnings("ignore", message=message)
