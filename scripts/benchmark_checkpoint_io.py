"""Training-thread time of checkpointing, ours (background_io.py) vs nnU-Net's `save_checkpoint`, on one ResEnc L state.

    python scripts/benchmark_checkpoint_io.py                   # ResEnc L (102.4 M parameters), local temp folder
    python scripts/benchmark_checkpoint_io.py --dir /lustre/me  # the filesystem your runs write to

The state is a real `ResidualEncoderUNet` built by nnunetv2's `get_network_from_plans` with ResEnc L's architecture
(nnUNetPlannerResEncL: 32..320 features, encoder blocks 1,3,4,6,6,6) for a 192³ patch at 1 mm (topology from
nnunetv2's `get_pool_and_conv_props`: 6 stages), SGD with nnU-Net's momentum after one step (momentum buffers
exist) and a grad scaler. Per epoch, in one process and alternating, it times on the calling (training) thread:

- ours, improving epoch: what the callbacks do when the EMA improves: nnU-Net's checkpoint_best.pth (NnUNetExport),
  last.ckpt and best.ckpt (ModelCheckpoint), then the boundary flush: host snapshot only; serialisation and
  writing run on the writer thread (its time is shown separately, overlapping the next epoch's training);
- ours, non-improving epoch: last.ckpt only;
- before (synchronous): the three atomic writes on the training thread, as before background writes;
- nnU-Net: `nnUNetTrainer.save_checkpoint` (one torch.save, as native nnU-Net writes checkpoint_best.pth).

It prints a table (median over `--epochs`), the `ratio` line (ours on an improving epoch / one nnU-Net write; the
issue's goal is ≤ 0.05), bytes serialised per improving epoch in units of the state, and the snapshot's peak host
memory. `--tiny` is a small network (the test's smoke run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from resenc_lightning import background_io  # noqa: E402
from resenc_lightning.atomic import atomic_save  # noqa: E402
from resenc_lightning.background_io import BackgroundCheckpointIO  # noqa: E402

MIB = 2**20


def resenc_l_network(tiny: bool) -> torch.nn.Module:
    """ResEnc L's architecture (nnUNetPlannerResEncL) for a 192³ patch; `tiny`: features / 16, a 32³ patch."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    patch = (32, 32, 32) if tiny else (192, 192, 192)
    _, strides, kernels, _, _ = get_pool_and_conv_props((1.0, 1.0, 1.0), patch, 4, 999999)
    n = len(strides)
    base, top = (2, 20) if tiny else (32, 320)
    arch = {"n_stages": n, "features_per_stage": [min(top, base * 2**i) for i in range(n)],
            "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": kernels, "strides": strides,
            "n_blocks_per_stage": [1, 3, 4, 6, 6, 6][:n], "n_conv_per_stage_decoder": [1] * (n - 1), "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True}}
    return get_network_from_plans("dynamic_network_architectures.architectures.unet.ResidualEncoderUNet", arch,
                                  ("conv_op", "norm_op", "dropout_op", "nonlin"), 1, 2, deep_supervision=True)


class State:
    """Network, SGD (nnU-Net's settings) with momentum buffers, grad scaler: what a checkpoint holds."""

    def __init__(self, tiny: bool, device: str = "cpu") -> None:
        self.network = resenc_l_network(tiny).to(device)
        self.optimizer = torch.optim.SGD(self.network.parameters(), lr=1e-2, momentum=0.99, nesterov=True,
                                         weight_decay=3e-5)
        self.scaler = torch.amp.GradScaler(torch.device(device).type)
        self.epoch = 0
        self.step()

    def step(self) -> None:
        """An optimizer step (random gradients): weights and momentum change in place, as in training."""
        for p in self.network.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        self.optimizer.step()
        self.epoch += 1

    @property
    def nbytes(self) -> int:
        params = sum(p.numel() * p.element_size() for p in self.network.parameters())
        return 2 * params  # weights + one momentum buffer each

    def lightning_checkpoint(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "global_step": self.epoch * 250, "pytorch-lightning_version": "2",
                "state_dict": {f"network.{k}": v for k, v in self.network.state_dict().items()},
                "optimizer_states": [self.optimizer.state_dict()], "lr_schedulers": [],
                "MixedPrecision": self.scaler.state_dict(), "callbacks": {"ModelCheckpoint": {"epoch": self.epoch}},
                "loops": {}, "nnunet": {"logging": {"train_losses": [0.5] * self.epoch}}}

    def nnunet_checkpoint(self) -> dict[str, Any]:
        """NnUNetExport.checkpoint's keys (nnUNetTrainer.save_checkpoint's dictionary)."""
        return {"network_weights": {k: v.detach() for k, v in self.network.state_dict().items()},
                "optimizer_state": self.optimizer.state_dict(), "grad_scaler_state": self.scaler.state_dict(),
                "logging": {"train_losses": [0.5] * self.epoch}, "_best_ema": 0.5, "current_epoch": self.epoch,
                "init_args": {}, "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2)}

    def nnunet_trainer(self) -> SimpleNamespace:
        """The attributes nnunetv2's `nnUNetTrainer.save_checkpoint` reads."""
        logger = SimpleNamespace(get_checkpoint=lambda: {"train_losses": [0.5] * self.epoch})
        return SimpleNamespace(local_rank=0, disable_checkpointing=False, is_ddp=False, network=self.network,
                               optimizer=self.optimizer, grad_scaler=self.scaler, logger=logger, _best_ema=0.5,
                               current_epoch=self.epoch, my_init_kwargs={}, inference_allowed_mirroring_axes=(0, 1, 2))


def timed(fn) -> float:
    os.sync()  # untimed: the previous arm's dirty pages are on disk, no arm pays for another's writeback
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ours(io: BackgroundCheckpointIO, state: State, folder: Path, improving: bool) -> tuple[float, float]:
    """(training-thread seconds, writer seconds) of one epoch end."""
    key = (state.epoch, state.epoch * 250)

    def epoch_end() -> None:
        if improving:
            io.save_derived(state.nnunet_checkpoint(), folder / "checkpoint_best.pth", key)
        io.save_checkpoint(state.lightning_checkpoint(), folder / "last.ckpt")
        if improving:
            io.save_checkpoint(state.lightning_checkpoint(), folder / "best.ckpt")
        io.flush()  # what CheckpointBoundaries does at the next epoch's start

    on_thread = timed(epoch_end)
    start = time.perf_counter()
    io.wait()  # the writer's time overlaps the next epoch's training in a real run
    return on_thread, time.perf_counter() - start + on_thread


def before(state: State, folder: Path) -> float:
    """The synchronous path this replaces: three separate atomic torch.save calls on the training thread."""
    def epoch_end() -> None:
        atomic_save(state.nnunet_checkpoint(), folder / "checkpoint_best.pth")
        atomic_save(state.lightning_checkpoint(), folder / "last.ckpt")
        atomic_save(state.lightning_checkpoint(), folder / "best.ckpt")
    return timed(epoch_end)


def nnunet(state: State, folder: Path) -> float:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    trainer = state.nnunet_trainer()
    return timed(lambda: nnUNetTrainer.save_checkpoint(trainer, str(folder / "native_checkpoint_best.pth")))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="folder on the filesystem to measure (default: a temp "
                                                               "folder under the system's temp dir)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per arm (median reported)")
    parser.add_argument("--tiny", action="store_true", help="a small network (smoke test)")
    parser.add_argument("--device", default="cpu", help="where the state lives: cpu, or cuda (snapshot to pinned host "
                                                         "memory; the figure the issue's goal is about)")
    parser.add_argument("--skip-before", action="store_true", help="do not time the previous synchronous path")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    state = State(args.tiny, args.device)
    params = sum(p.numel() for p in state.network.parameters())
    serialised: list[int] = []
    real_save = background_io.atomic_save

    def counting_save(obj: Any, path: Any, *rest: Any) -> None:
        real_save(obj, path, *rest)
        serialised.append(Path(path).stat().st_size)

    background_io.atomic_save = counting_save  # the writer's serialisations (copies are not)
    rows: dict[str, list[float]] = {"improving": [], "improving_writer": [], "plain": [], "plain_writer": [],
                                    "before": [], "nnunet": []}
    bytes_improving: list[int] = []
    bytes_plain: list[int] = []
    parent = args.dir if args.dir is not None else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix="ckpt_bench_") as tmp:
        folder = Path(tmp)
        for arm in ("ours", "before", "nnunet"):  # each arm replaces only its own files
            (folder / arm).mkdir()
        io = BackgroundCheckpointIO()
        for _ in range(args.epochs):
            rows["nnunet"].append(nnunet(state, folder / "nnunet"))
            state.step()
            serialised.clear()
            t, w = ours(io, state, folder / "ours", improving=True)
            rows["improving"].append(t)
            rows["improving_writer"].append(w)
            bytes_improving.append(sum(serialised))
            state.step()
            serialised.clear()
            t, w = ours(io, state, folder / "ours", improving=False)
            bytes_plain.append(sum(serialised))
            rows["plain"].append(t)
            rows["plain_writer"].append(w)
            if not args.skip_before:
                state.step()
                rows["before"].append(before(state, folder / "before"))
            state.step()
        io.teardown()
    background_io.atomic_save = real_save

    med = {k: statistics.median(v) for k, v in rows.items() if v}
    state_mib = state.nbytes / MIB
    print(f"State: ResidualEncoderUNet{' (tiny)' if args.tiny else ' (ResEnc L)'}, {params / 1e6:.1f} M parameters on "
          f"{args.device}; weights + SGD momentum {state_mib:.0f} MiB; folder {parent}; median of {args.epochs} epochs")
    print()
    print("| per epoch | training thread (ms) | writer thread (ms) | bytes serialised |")
    print("|---|---|---|---|")
    print(f"| ours, improving epoch (last + best + checkpoint_best.pth) | {med['improving'] * 1e3:.1f} | "
          f"{med['improving_writer'] * 1e3:.0f} | {statistics.median(bytes_improving) / state.nbytes:.2f}× state |")
    print(f"| ours, non-improving epoch (last) | {med['plain'] * 1e3:.1f} | {med['plain_writer'] * 1e3:.0f} | "
          f"{statistics.median(bytes_plain) / state.nbytes:.2f}× state |")
    if "before" in med:
        print(f"| before: synchronous, improving epoch | {med['before'] * 1e3:.0f} | – | 3× state |")
    print(f"| nnU-Net save_checkpoint (one write) | {med['nnunet'] * 1e3:.0f} | – | 1× state |")
    print()
    ratio = med["improving"] / med["nnunet"]
    print(f"ratio ours improving epoch / one nnU-Net write (training thread) = {ratio:.3f} (goal <= 0.05)")
    print(f"ratio ours non-improving epoch / one nnU-Net write (training thread) = {med['plain'] / med['nnunet']:.3f}")
    print(f"bytes serialised per improving epoch = {statistics.median(bytes_improving) / MIB:.0f} MiB "
          f"= {statistics.median(bytes_improving) / state.nbytes:.2f}× the state ({state_mib:.0f} MiB)")
    print(f"peak host memory of the snapshot = {io.peak_snapshot_bytes / MIB:.0f} MiB "
          f"({io.peak_snapshot_bytes / state.nbytes:.2f}× the state)")
    return {**med, "ratio": ratio, "peak_snapshot_bytes": io.peak_snapshot_bytes, "state_bytes": state.nbytes}


if __name__ == "__main__":
    main()
