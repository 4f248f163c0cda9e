"""The stages a parsed trainer configuration will run, read the same way from either shape of
``parse_args``'s result (the run plan object, or the older flat namespace)."""


def stages(config) -> dict:
    """``{stage name: (K, steps)}`` in run order, e.g. ``{"patch": (4, 16), "token": (1, 8)}``."""
    if hasattr(config, "plan"):
        return {stage.name: (stage.patch_size, stage.iterations) for stage in config.plan.stages}
    result = {}
    if config.patch_size > 1 and config.stage in ("both", "patch"):
        result["patch"] = (config.patch_size, config.patch_iters)
    if config.stage in ("both", "token"):
        result["token"] = (1, config.token_iters)
    return result
