"""Two-stage patch-level pre-training on Megatron-Core (see README for launch examples).

torchrun --nproc_per_node=8 examples/pretrain_patch_gpt.py --model 370m --bf16 ...
"""

if __name__ == "__main__":
    # Imports stay inside the guard, so a process that re-imports this file (one started with the
    # "spawn" method) pays nothing for it.
    import os
    import sys

    # from a checkout without `pip install -e .` (e.g. a GPU machine given megatron-core alone)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_patch.training.cli import main

    sys.exit(main(process_exits=True))
