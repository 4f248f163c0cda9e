"""RMSNorm for the local (non-Transformer-Engine) layer spec, sequence-parallel aware.

megatron.core's local spec wraps ``torch.nn.RMSNorm``, which refuses sequence parallelism. This
module computes the same ``torch.nn.functional.rms_norm`` and marks its weight with
``sequence_parallel`` so ``finalize_model_grads`` all-reduces its gradient across the
tensor-parallel group, as TE and Apex norms do.
"""

import torch
from megatron.core.transformer import TransformerConfig


class RMSNorm(torch.nn.Module):
    """``y = x / rms(x) * weight`` over the last dimension.

    Args:
        config: model config (``params_dtype``, ``sequence_parallel``).
        hidden_size: h, the normalised width.
        eps: added to the mean square.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        if config.normalization != "RMSNorm":
            raise ValueError(
                f"normalization={config.normalization!r} with megatron_patch.architecture.norm.RMSNorm: "
                f"set normalization='RMSNorm' (the paper's architecture)"
            )
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[s, b, h] -> [s, b, h]``."""
        return torch.nn.functional.rms_norm(hidden_states, (self.hidden_size,), self.weight, self.eps)
