"""`--memcheck`: does this plans' batch and patch fit this GPU, and with how much to spare?

Runs real training steps (forward, nnU-Net's loss, backward, clip, SGD step, with the run's
precision and cudnn.benchmark as in training) at the plans' *global* batch and patch on the
current GPU, and reports peak allocated/reserved memory against the card and the plans' VRAM
target, with the planner command that fits when it does not. The peaks are those of the steps
after the first: in the first, cuDNN's benchmark tries workspaces sized to the card's free
memory (on an 80 GB card tens of GB), which training does not hold (the warm-up releases them).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from resenc_lightning.memory_target import GB, decide_cap, planner_command, plans_target_gb
from resenc_lightning.recipe import random_label_loss


class MemcheckError(RuntimeError):
    pass


@dataclass
class MemcheckResult:
    device: str
    total_gb: float
    target_gb: float | None
    batch_shape: tuple[int, ...]
    peak_allocated_gb: float
    peak_reserved_gb: float
    step_s: float
    fits_card: bool
    fits_target: bool
    advice: str
    benchmark_peak_reserved_gb: float = 0.0

    def report(self) -> str:
        target = f"{self.target_gb:g} GB" if self.target_gb is not None else "unknown"
        lines = [
            f"memcheck on {self.device} ({self.total_gb:.1f} GB), batch {self.batch_shape}:",
            f"  peak allocated {self.peak_allocated_gb:.2f} GB, peak reserved {self.peak_reserved_gb:.2f} GB, "
            f"step {self.step_s * 1000:.0f} ms (cuDNN benchmark step {self.benchmark_peak_reserved_gb:.1f} GB reserved: "
            f"trial workspaces sized to the free memory, released before training, not counted)",
            f"  plans' VRAM target {target}: {'fits' if self.fits_target else 'EXCEEDED'}; "
            f"card with headroom: {'fits' if self.fits_card else 'DOES NOT FIT'}",
        ]
        if self.advice:
            lines.append(f"  {self.advice}")
        return "\n".join(lines)


@dataclass
class Peaks:
    peak_allocated_gb: float
    peak_reserved_gb: float
    step_s: float
    benchmark_peak_reserved_gb: float = 0.0


def measure_peaks(step: Callable[[], float], device: Any, steps: int, cuda: Any = torch.cuda) -> Peaks:
    """Peak allocated/reserved memory over `steps` training steps after one benchmark step (`step` returns its time
    in seconds). The benchmark step's trial workspaces are released and the peaks reset before the measured steps,
    as training runs after the warm-up; cuDNN's picks are cached, so the measured steps do not benchmark again."""
    cuda.empty_cache()
    cuda.reset_peak_memory_stats(device)
    step()  # cuDNN benchmarks every convolution here
    cuda.synchronize(device)
    benchmark_reserved = cuda.max_memory_reserved(device) / GB
    cuda.empty_cache()
    cuda.reset_peak_memory_stats(device)  # both peaks, allocated and reserved, restart from what is held now
    times = [step() for _ in range(steps)]
    return Peaks(cuda.max_memory_allocated(device) / GB, cuda.max_memory_reserved(device) / GB, min(times),
                 benchmark_reserved)


def run_memcheck(model, datamodule, precision: str = "16-mixed", steps: int = 2,
                 headroom_fraction: float = 0.1, min_headroom_gb: float = 2.0) -> MemcheckResult:
    if not torch.cuda.is_available():
        raise MemcheckError("--memcheck measures GPU memory and needs a CUDA GPU; none is visible here "
                            "(check CUDA_VISIBLE_DEVICES / nvidia-smi).")
    spec = datamodule.spec
    device = torch.device("cuda", torch.cuda.current_device())
    cm = spec.configuration_manager
    shape = (int(cm.batch_size), int(model.num_input_channels), *cm.patch_size)
    model = model.to(device)
    model.configure_model()
    optimizer = model.configure_optimizers()["optimizer"]
    use_amp = precision.startswith(("16", "bf16"))
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and dtype == torch.float16)
    torch.backends.cudnn.benchmark = True
    generator = torch.Generator(device=device).manual_seed(0)
    model.train()

    def step() -> float:
        x = torch.randn(shape, generator=generator, device=device)
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype, enabled=use_amp):
            loss = random_label_loss(model, model(x), generator)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12)
        scaler.step(optimizer)
        scaler.update()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000

    try:
        peaks = measure_peaks(step, device, steps)
    except torch.OutOfMemoryError:
        allocated = torch.cuda.max_memory_allocated(device) / GB
        total = torch.cuda.get_device_properties(device).total_memory
        cap = decide_cap(total, 0, headroom_fraction=headroom_fraction, min_headroom_gb=min_headroom_gb)
        raise MemcheckError(
            f"out of memory at batch {shape} after {allocated:.1f} GB allocated on a {total / GB:.1f} GB card; "
            f"re-plan with: {planner_command(spec.plans, spec.dataset_id, cap.max_fit_gb)}"
        ) from None
    props = torch.cuda.get_device_properties(device)
    return judge(props.name, props.total_memory, shape, peaks, spec, headroom_fraction, min_headroom_gb)


def judge(device_name: str, total_bytes: int, shape: tuple[int, ...], peaks: Peaks, spec: Any,
          headroom_fraction: float = 0.1, min_headroom_gb: float = 2.0) -> MemcheckResult:
    """The verdict on measured peaks: fits the card with headroom, fits the plans' target, and the re-plan advice."""
    peak_alloc, peak_res = peaks.peak_allocated_gb, peaks.peak_reserved_gb
    target, _ = plans_target_gb(spec.plans)
    cap = decide_cap(total_bytes, target or 0, headroom_fraction=headroom_fraction, min_headroom_gb=min_headroom_gb)
    fits_card = peak_res <= cap.max_fit_gb
    fits_target = target is None or peak_res <= target
    advice = ""
    if not fits_card or (target is not None and target > cap.max_fit_gb):
        advice = f"re-plan for this card with: {planner_command(spec.plans, spec.dataset_id, math.floor(cap.max_fit_gb))}"
    return MemcheckResult(device_name, total_bytes / GB, target, shape, peak_alloc, peak_res, peaks.step_s, fits_card,
                          fits_target, advice, peaks.benchmark_peak_reserved_gb)
