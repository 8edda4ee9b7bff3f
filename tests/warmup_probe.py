"""Test-only callbacks for the warm-up under DDP, loaded in the `python train.py` subprocesses through
`--trainer.callbacks`; each rank writes `rank<N>.json` into `out_dir`.

* SlowRankProbe: a resumed run (a fresh reference as a checkpoint would restore it) where only `slow_rank`
  measures its warm-up twice as slow as the reference; counts every rank's warm-up training forwards.
* DDPSplitProbe: small DDP buckets, and the bucket count of every graph DDPOptimizer compiles.
"""

from __future__ import annotations

import torch
from ddp_probe import RankJson

from resenc_lightning.callbacks.cudnn_pinning import CudnnPinning


class SlowRankProbe(RankJson):
    def __init__(self, out_dir: str, slow_rank: int = 1) -> None:
        super().__init__(out_dir)
        self.slow_rank = slow_rank
        self.record = {"warm_ups": 0, "warm_up_train_forwards": 0}
        self._in_warm_up = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        pin = next(c for c in trainer.callbacks if isinstance(c, CudnnPinning))
        real = pin.warm_up

        def warm_up(trainer, pl_module):
            self.record["warm_ups"] += 1
            self._in_warm_up = True
            try:
                record = real(trainer, pl_module)
            finally:
                self._in_warm_up = False
            record["train_step_s"] = 2.0 if trainer.global_rank == self.slow_rank else 1.0
            return record

        pin.warm_up = warm_up
        pl_module.network.register_forward_pre_hook(self._count)
        self.record["rank"] = trainer.global_rank

    def on_fit_start(self, trainer, pl_module) -> None:
        """What --resume restores before on_train_start: the fresh run's reference at these shapes."""
        pin = next(c for c in trainer.callbacks if isinstance(c, CudnnPinning))
        train, val = pin.shapes(trainer, pl_module)
        pin.load_state_dict({"reference": {
            "train_shape": list(train), "val_shape": list(val), "device": "cpu", "train_step_s": 1.0,
            "precision": type(trainer.precision_plugin).__name__, "peak_reserved": 0, "free_before": 0,
        }, "history": []})

    def _count(self, module, args) -> None:
        if self._in_warm_up and module.training:
            self.record["warm_up_train_forwards"] += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pin = next(c for c in trainer.callbacks if isinstance(c, CudnnPinning))
        self.record["retries"] = pin.history[-1]["retries"] if pin.history else None
        super().on_train_epoch_end(trainer, pl_module)


class DDPSplitProbe(RankJson):
    """Buckets of `bucket_kb` KiB (DDP's and DDPOptimizer's first bucket included; the tiny network has ~80 KB of
    parameters) and, per graph compiled inside DDP.forward, how many pieces DDPOptimizer split it into."""

    def __init__(self, out_dir: str, bucket_kb: int = 32) -> None:
        super().__init__(out_dir)
        self.bucket_kb = bucket_kb
        self.record = {"ddp_optimizer_buckets": []}

    def setup(self, trainer, pl_module, stage: str) -> None:
        from torch._dynamo.backends.distributed import DDPOptimizer

        torch.distributed._DEFAULT_FIRST_BUCKET_BYTES = self.bucket_kb * 1024
        trainer.strategy._ddp_kwargs["bucket_cap_mb"] = self.bucket_kb / 1024
        real_compile = DDPOptimizer.compile_fn
        record = self.record

        def compile_fn(optimizer, gm, example_inputs, **kwargs):
            out = real_compile(optimizer, gm, example_inputs, **kwargs)
            record["ddp_optimizer_buckets"].append(len(optimizer.buckets))
            return out

        DDPOptimizer.compile_fn = compile_fn
