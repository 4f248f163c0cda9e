"""Two-stage patch-level pre-training on Megatron-Core (see README for launch examples).

torchrun --nproc_per_node=8 examples/pretrain_patch_gpt.py --model 370m --bf16 ...
"""

if __name__ == "__main__":
    # Imports stay inside the guard: dist_checkpointing starts a helper process with the "spawn"
    # method, which re-imports this file; a light import keeps that to a fraction of a second.
    import sys

    from megatron_patch.training.cli import main

    sys.exit(main())
