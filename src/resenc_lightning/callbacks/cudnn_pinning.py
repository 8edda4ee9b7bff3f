"""Pin cuDNN's convolution algorithms: benchmark once, at the exact shapes, in a clean memory state.

With ``cudnn.benchmark`` PyTorch picks each convolution's algorithm the first time a shape is seen,
among the candidates whose workspace fits the memory free *at that moment*, and caches the pick for
the life of the process. nnU-Net enables benchmark after loading the checkpoint onto the GPU, so a
resumed run benchmarks with less free memory than a fresh one, can lose the fast big-workspace
algorithms and stays ~25% slower for the rest of the run.

This callback, in ``on_train_start`` (after Lightning restored the checkpoint, which it loads on
the CPU, and emptied the cache):

1. releases leftover memory (``gc`` + ``empty_cache``);
2. makes a resumed run's memory picture equal to a fresh run's: SGD's momentum buffers only
   exist after the first step, so a fresh nnU-Net run benchmarks without them, a resumed one with
   them resident (0.38 GiB for ResEnc L). The optimizer state is moved to the CPU for the warm-up
   and copied back afterwards (same values), and if the device still has more free memory than the
   fresh run had at its warm-up, a padding block takes up the difference, so cuDNN's free-memory
   query returns what it returned in the fresh run (under a fraction cap the cap grows by the pad while
   it lives, so the workspace headroom stays the fresh run's: memory_pad.py);
3. with ``cudnn.benchmark=True`` runs training steps (forward, loss, backward) and a validation step on a
   batch built like a real one, through the strategy as Lightning's loops do (warmup_steps.py: the graphs
   compiled here are the ones training uses, DDP wrapping included), with a private RNG, restoring
   gradients, buffers, the module's per-step accumulators and all RNG streams afterwards: weights,
   optimizer state, norm statistics, pseudo-Dice and RNG are unchanged;
4. sets ``cudnn.benchmark=False``: the picks are frozen (cached plans keep being used; a new shape
   would get the heuristic pick rather than a benchmark under other memory conditions).

The warm-up step time, peak memory and shapes go into the callback state (the checkpoint). A
resumed run repeats the warm-up and compares with the fresh run's reference; slower beyond
``tolerance`` it releases caches and re-measures (``max_retries``), then warns with both numbers.

Under DDP every warm-up step issues collectives (DDP's gradient all-reduce; batch Dice's all-gather), so
each decision that changes how many steps run (warm up at all, retry) is agreed across ranks: a rank that
cannot warm up stops all, a rank that is slow makes all retry. With deterministic algorithms on, cuDNN must
not benchmark, so there is no warm-up at all (one info line).
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Any

import lightning.pytorch as pl
import torch

from resenc_lightning import rank_report, warmup_steps
from resenc_lightning.memory_pad import FreeMemoryPad, pad_free_memory
from resenc_lightning.rng import collect_rng_states, set_rng_states


class CudnnPinning(pl.Callback):
    """Benchmark cuDNN once at the training/validation shapes in a clean memory state, then freeze.

    Args:
        enabled: switch the warm-up and pinning off (cuDNN then behaves as configured by the Trainer).
        warmup_steps: forward+backward passes at the training shape (the first one benchmarks).
        tolerance: a resumed warm-up slower than the fresh reference by more than this fraction is retried.
        max_retries: how often to release caches and re-measure before warning.
        equalize_optimizer_state: on resume, move the optimizer state off the GPU during the warm-up and pad
            free memory down to the fresh run's, so both benchmark under the same free memory.
        run_on_cpu: also run the warm-up on CPU (no cuDNN there; used by the tests).
    """

    def __init__(self, enabled: bool = True, warmup_steps: int = 3, tolerance: float = 0.05, max_retries: int = 2,
                 equalize_optimizer_state: bool = True, run_on_cpu: bool = False) -> None:
        self.enabled = enabled
        self.warmup_steps = max(1, warmup_steps)
        self.tolerance = tolerance
        self.max_retries = max_retries
        self.equalize_optimizer_state = equalize_optimizer_state
        self.run_on_cpu = run_on_cpu
        self.reference: dict[str, Any] | None = None
        self.history: list[dict[str, Any]] = []
        self.warning: str | None = None
        self._benchmark_before: bool | None = None
        self._restored = False

    # -- Lightning hooks -----------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        reason = self.skip_reason(pl_module.device)
        if not trainer.strategy.reduce_boolean_decision(reason is None, all=True):  # collectives: all ranks or none
            rank_report.info(reason or "CudnnPinning: another rank cannot warm up, so no rank does (its reason is in "
                                       "its log).")
            return
        self._benchmark_before = torch.backends.cudnn.benchmark
        resumed = self._restored and self.reference is not None
        record = {**self.warm_up(trainer, pl_module), "resumed": resumed, "epoch": trainer.current_epoch}
        record = self._retry_while_slow(trainer, pl_module, record)
        if self.reference is None or not self._comparable(record):
            self.reference = dict(record)
        self.history.append(record)
        rank_report.info(
            f"CudnnPinning: warm-up at train {record['train_shape']} / val {record['val_shape']}: "
            f"{record['train_step_s'] * 1000:.1f} ms/step, peak reserved {record['peak_reserved'] / 2**30:.2f} GiB"
            + (f" (fresh reference {self.reference['train_step_s'] * 1000:.1f} ms)" if resumed else "")
            + "; cuDNN algorithms pinned (benchmark off)."
        )

    def skip_reason(self, device: torch.device) -> str | None:
        """Why this rank does not warm up (None: it does)."""
        if device.type != "cuda" and not self.run_on_cpu:
            return f"CudnnPinning: device is {device.type}, no cuDNN algorithms to pin."
        if torch.are_deterministic_algorithms_enabled() or torch.backends.cudnn.deterministic:
            return ("CudnnPinning: deterministic algorithms are on, so cuDNN must not benchmark: no warm-up, "
                    "cudnn.benchmark left as the Trainer set it.")
        return None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._benchmark_before is not None:
            torch.backends.cudnn.benchmark = self._benchmark_before

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reference = state_dict.get("reference")
        self.history = list(state_dict.get("history", []))
        self._restored = True

    # -- the warm-up -----------------------------------------------------------------------------------------
    def shapes(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(train, val) input shapes: this rank's batch, the plans' channels and patch (nnU-Net uses both)."""
        batch = int(trainer.datamodule.batch_size)
        shape = (batch, int(pl_module.num_input_channels), *pl_module.patch_size)
        return shape, shape

    def warm_up(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        device = pl_module.device
        train_shape, val_shape = self.shapes(trainer, pl_module)
        on_cuda = device.type == "cuda"
        rng = collect_rng_states()
        buffers = {name: b.detach().clone() for name, b in pl_module.named_buffers()}
        grads = {p: p.grad for p in pl_module.parameters()}
        accumulators = {k: list(v) for k, v in vars(pl_module).items() if type(v) is list}  # losses, Dice rows
        was_training = pl_module.training
        generator = torch.Generator().manual_seed(0)
        batch = warmup_steps.synthetic_batch(pl_module, train_shape[0], generator)
        gc.collect()
        if on_cuda:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        batch = warmup_steps.on_device(trainer, batch)
        offloaded = self._offload_optimizer_state(trainer, device) if self.equalize_optimizer_state else []
        if on_cuda:
            torch.cuda.empty_cache()
        free_before = torch.cuda.mem_get_info(device)[0] if on_cuda else 0
        pad = self._pad_to_reference(device, free_before) if self.equalize_optimizer_state else None
        free_at_benchmark = torch.cuda.mem_get_info(device)[0] if on_cuda else 0
        torch.backends.cudnn.benchmark = True
        step_times: list[float] = []
        try:
            for _ in range(self.warmup_steps):
                start = _now(device)
                warmup_steps.train_step(trainer, batch)
                step_times.append(_now(device) - start)
                for p in pl_module.parameters():
                    p.grad = None
            start = _now(device)
            warmup_steps.validation_step(trainer, batch)
            val_time = _now(device) - start
        finally:
            torch.backends.cudnn.benchmark = False  # freeze: nothing re-benchmarks under other memory later
            if pad is not None:
                pad.release()
            del batch
            self._restore_optimizer_state(offloaded, device)
            for p, g in grads.items():
                p.grad = g
            with torch.no_grad():
                for name, b in pl_module.named_buffers():
                    if name in buffers:
                        b.copy_(buffers[name])
            for name, values in accumulators.items():
                getattr(pl_module, name)[:] = values
            trainer.model.train(was_training)
            set_rng_states(rng)
        timed = step_times[1:] or step_times
        return {
            "train_shape": list(train_shape), "val_shape": list(val_shape),
            "train_step_s": statistics.median(timed), "first_step_s": step_times[0], "val_step_s": val_time,
            "peak_allocated": torch.cuda.max_memory_allocated(device) if on_cuda else 0,
            "peak_reserved": torch.cuda.max_memory_reserved(device) if on_cuda else 0,
            "free_before": int(free_before), "free_at_benchmark": int(free_at_benchmark),
            "offloaded_bytes": int(sum(t.numel() * t.element_size() for *_, t in offloaded)),
            "pad_bytes": pad.nbytes if pad is not None else 0,
            "device": _device_name(device),
            "precision": str(trainer.precision_plugin.__class__.__name__), "retries": 0,
        }

    @staticmethod
    def _offload_optimizer_state(trainer: pl.Trainer, device: torch.device) -> list[tuple[dict, str, torch.Tensor]]:
        """Move the optimizer's device tensors (momentum) to the CPU: a fresh run benchmarks without them."""
        moved = []
        for optimizer in trainer.optimizers:
            for state in optimizer.state.values():
                for key, value in list(state.items()):
                    if torch.is_tensor(value) and value.device == device and value.numel() > 1:
                        state[key] = value.to("cpu")
                        moved.append((state, key, state[key]))
        return moved

    @staticmethod
    def _restore_optimizer_state(moved: list[tuple[dict, str, torch.Tensor]], device: torch.device) -> None:
        for state, key, value in moved:
            state[key] = value.to(device)

    def _pad_to_reference(self, device: torch.device, free: int) -> FreeMemoryPad | None:
        """Occupy what is free beyond the fresh run's free memory at its warm-up (resumed runs only), without
        taking it out of a fraction cap's headroom (memory_pad.py)."""
        ref = self.reference or {}
        target = ref.get("free_at_benchmark")
        if device.type != "cuda" or not self._restored or not target or ref.get("device") != _device_name(device):
            return None
        pad, why_not = pad_free_memory(device, free, int(target))
        if why_not:
            rank_report.warn(f"CudnnPinning: {why_not}; warming up with {free / 2**30:.2f} GiB free instead of the "
                             f"fresh run's {int(target) / 2**30:.2f} GiB.")
        return pad

    # -- resume comparison -----------------------------------------------------------------------------------
    def _comparable(self, record: dict[str, Any]) -> bool:
        ref = self.reference
        return bool(ref) and all(ref.get(k) == record.get(k) for k in ("train_shape", "val_shape", "device", "precision"))

    def _slow(self, record: dict[str, Any]) -> bool:
        """A resumed warm-up slower than the fresh reference beyond tolerance."""
        if not record["resumed"] or not self._comparable(record):
            return False
        return record["train_step_s"] > self.reference["train_step_s"] * (1 + self.tolerance)

    def _retry_while_slow(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                          record: dict[str, Any]) -> dict[str, Any]:
        retries = 0
        # every rank retries when any rank is slow: each warm-up issues collectives, their count must match
        while retries < self.max_retries and trainer.strategy.reduce_boolean_decision(self._slow(record), all=False):
            retries += 1
            gc.collect()
            if pl_module.device.type == "cuda":
                torch.cuda.empty_cache()
            record = {**self.warm_up(trainer, pl_module), "resumed": True, "epoch": trainer.current_epoch}
        record["retries"] = retries
        if self._slow(record):
            ref = self.reference
            self.warning = (
                f"CudnnPinning: resumed warm-up step {record['train_step_s'] * 1000:.1f} ms is "
                f"{record['train_step_s'] / ref['train_step_s'] - 1:+.0%} vs the fresh run's "
                f"{ref['train_step_s'] * 1000:.1f} ms "
                f"(peak reserved {record['peak_reserved'] / 2**30:.2f} vs {ref['peak_reserved'] / 2**30:.2f} GiB, free at "
                f"warm-up {record['free_before'] / 2**30:.2f} vs {ref['free_before'] / 2**30:.2f} GiB) after {retries} "
                f"retries; other processes on the GPU or a lower memory cap are the usual causes."
            )
            rank_report.warn(self.warning)
        return record


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type
