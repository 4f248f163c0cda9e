"""Activation memory of the trainer's model per transformer layer, for ``memory_plan.py``
(``throughput.py --measure-layer-activations``; the method is in throughput.py's docstring)."""

from __future__ import annotations

import dataclasses
import itertools
from collections import defaultdict
from typing import List

from common import fmt, free_memory, synthetic_batches, trainer_config


# --------------------------------------------------------------------------- activation measurement
class SavedTensorMeter:
    """Bytes of the tensors autograd saves for backward, per region (``pre``, ``layer<i>``, ``post``).

    Each storage counts once (a tensor saved by two ops, or a view of a saved tensor, adds nothing);
    parameters are excluded. References to the saved storages are held until ``close()`` so that
    no storage can be freed and its address reused during the forward.
    """

    def __init__(self, model):
        import torch

        self.params = {self._key(p.untyped_storage()) for p in model.parameters()}
        self.region, self.bytes, self.storages, self.handles = "pre", defaultdict(int), {}, []
        inner = model
        while hasattr(inner, "module"):
            inner = inner.module
        decoder = inner.decoder
        for i, layer in enumerate(decoder.layers):
            self.handles.append(layer.register_forward_pre_hook(self._enter(f"layer{i}")))
        if getattr(decoder, "final_layernorm", None) is not None:
            self.handles.append(decoder.final_layernorm.register_forward_pre_hook(self._enter("post")))
        self.handles.append(decoder.register_forward_hook(lambda *unused: self._set("post")))
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _set(self, region):
        self.region = region

    def _enter(self, region):
        return lambda *unused: self._set(region)

    @staticmethod
    def _key(storage):
        return storage.device, storage.data_ptr()

    def _pack(self, tensor):
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a tensor without a plain storage: count it as is
            self.bytes[self.region] += tensor.numel() * tensor.element_size()
            return tensor
        key = self._key(storage)
        if key not in self.params and key not in self.storages and storage.nbytes() > 0:
            self.storages[key] = storage
            self.bytes[self.region] += storage.nbytes()
        return tensor

    def close(self):
        for handle in self.handles:
            handle.remove()
        self.storages.clear()


def run_layer_activations(opts) -> List[dict]:
    import torch
    from megatron.core.transformer.module import Float16Module

    from megatron_patch.architecture.build import TRANSFORMER_IMPLS
    from megatron_patch.loss import patch_targets
    from megatron_patch.model import build_patch_gpt_model

    cuda = not opts.cpu
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    records = []
    for recompute in opts.recompute_granularity:
        settings = trainer_config(opts, recompute).model
        config = settings.transformer_config(cpu=not cuda)
        if opts.layers is not None:
            config = dataclasses.replace(config, num_layers=opts.layers)
        vocab = settings.padded_vocab_size
        model = build_patch_gpt_model(
            config,
            vocab,
            opts.seq_length,
            use_transformer_engine=TRANSFORMER_IMPLS[settings.transformer_impl],
            fused_rope=settings.attention_rope_fusion,
            fused_cross_entropy=settings.cross_entropy_fusion,
            sdpa_backend=settings.sdpa_backend,
        )
        if cuda:
            model.cuda(device)
        if settings.bf16:
            model = Float16Module(config, model)
        model.train()
        for K, b in itertools.product(opts.patch_sizes, opts.micro_batch_size):
            record = {
                "model": opts.model,
                "seq_length": opts.seq_length,
                "vocab_size": vocab,
                "patch_size": K,
                "micro_batch_size": b,
                "recompute": recompute,
                "layers_built": config.num_layers,
                "dtype": "bfloat16" if settings.bf16 else "float32",
                "device": "cuda" if cuda else "cpu",
            }
            batch = synthetic_batches(b, K * opts.seq_length, opts.vocab_size, 1, opts.seed, pin=False)[0]
            tokens = batch["tokens"].to(device)
            labels, _ = patch_targets(batch["labels"].to(device), None, K)  # [b, T, K]
            try:
                # (2) peak of one forward+backward above what is allocated before it, after one
                # untimed pass at this shape (kernel workspaces and lazy buffers come first)
                for _ in range(2):
                    for p in model.parameters():
                        p.grad = None
                    free_memory(cuda)
                    if cuda:
                        torch.cuda.synchronize()
                        base = torch.cuda.memory_allocated()
                        torch.cuda.reset_peak_memory_stats()
                    model(tokens, None, None, labels=labels, patch_size=K).sum().backward()
                if cuda:
                    torch.cuda.synchronize()
                    record["peak_above_base_bytes"] = torch.cuda.max_memory_allocated() - base
                else:
                    record["peak_above_base_bytes"] = None
                for p in model.parameters():
                    p.grad = None
                # (1) what autograd saves, per region
                meter = SavedTensorMeter(model)
                try:
                    with meter.hooks:
                        output = model(tokens, None, None, labels=labels, patch_size=K)
                    saved = dict(meter.bytes)
                    del output
                finally:
                    meter.close()
            except torch.OutOfMemoryError as error:
                record["error"] = "OOM: " + str(error).split("\n")[0][:160]
            else:
                layers = [saved.get(f"layer{i}", 0) for i in range(config.num_layers)]
                record.update(
                    layer_bytes=layers,
                    pre_bytes=saved.get("pre", 0),
                    post_bytes=saved.get("post", 0),
                    saved_total_bytes=sum(saved.values()),
                )
            free_memory(cuda)
            records.append(record)
            print(f"  {_record_line(record)}", flush=True)
        del model
        free_memory(cuda)
    return records


def _record_line(r: dict) -> str:
    head = f"recompute={r['recompute']} K={r['patch_size']} b={r['micro_batch_size']}:"
    if "error" in r:
        return f"{head} {r['error']}"
    return f"{head} max layer {max(r['layer_bytes']) / 2**20:.2f} MiB saved"


def activation_table(records: List[dict]) -> str:
    lines = [
        "| recompute | K | b | layers built | saved per layer MiB (max) | per layer per sequence MiB "
        "| pre MiB | post MiB | fwd+bwd peak above base MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        cells = [r["recompute"], str(r["patch_size"]), str(r["micro_batch_size"]), str(r["layers_built"])]
        if "error" in r:
            cells += ["OOM" if r["error"].startswith("OOM") else r["error"]] + [""] * 4
        else:
            layer = max(r["layer_bytes"])
            peak = r["peak_above_base_bytes"]
            cells += [
                f"{layer / 2**20:.3f}",
                f"{layer / r['micro_batch_size'] / 2**20:.3f}",
                f"{r['pre_bytes'] / 2**20:.3f}",
                f"{r['post_bytes'] / 2**20:.3f}",
                fmt(None if peak is None else peak / 2**20, ".1f", "n/a (CPU)"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
