"""`--data.augment_on_device` for `3d_cascade_fullres`: the cascade's transforms on the device, proven on the CPU.

The previous stage's segmentations are stand-ins (each case's label map shifted by one voxel, written where the
3d_lowres final validation writes them): the loader and the transforms only need a label map per case, and training
3d_lowres first (tests/test_cascade.py does) would cost a minute here.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.nnunet.random_binary_operator import ApplyRandomBinaryOperatorTransform
from batchgeneratorsv2.transforms.nnunet.remove_connected_components import (
    RemoveRandomConnectedComponentFromOneHotEncodingTransform,
)
from batchgeneratorsv2.transforms.nnunet.seg_to_onehot import MoveSegAsOneHotToDataTransform
from conftest import TINY_PLANS
from test_cascade import CASCADE_PLANS, add_cascade, model_folder, run_args
from test_device_augment import assert_batch_parity, assert_same, leaves, seed_all, switch_on_datamodule

from resenc_lightning import recipe
from resenc_lightning.data import NnUNetDataModule
from resenc_lightning.device_augment import REWRITTEN, DeviceAugmentation, to_device_pipeline

CASCADE_TRANSFORMS = (MoveSegAsOneHotToDataTransform, ApplyRandomBinaryOperatorTransform,
                      RemoveRandomConnectedComponentFromOneHotEncodingTransform)


@pytest.fixture(scope="module")
def cascade_results(tiny_dataset, tmp_path_factory) -> Path:
    """Cascade plans and stand-in 3d_lowres next-stage segmentations for every case."""
    import blosc2
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    plans = json.loads((tiny_dataset / f"{TINY_PLANS}.json").read_text())
    (tiny_dataset / f"{CASCADE_PLANS}.json").write_text(json.dumps(add_cascade(plans, CASCADE_PLANS), indent=2))
    results = tmp_path_factory.mktemp("devaug_cascade") / "results"
    folder = model_folder(results, "3d_lowres") / "predicted_next_stage" / "3d_cascade_fullres"
    folder.mkdir(parents=True)
    source = tiny_dataset / "nnUNetPlans_3d_fullres"
    cases = sorted(p.name[:-len("_seg.b2nd")] for p in source.glob("*_seg.b2nd"))
    dataset = nnUNetDatasetBlosc2(str(source), cases)
    for case in cases:
        seg = np.clip(np.asarray(dataset.load_case(case)[1][0]), 0, None)
        blosc2.asarray(np.ascontiguousarray(np.roll(seg, 1, axis=0)).astype(np.int16),
                       urlpath=str(folder / f"{case}.b2nd"))
    return results


@pytest.fixture(scope="module")
def cascade_datamodule(cascade_results) -> NnUNetDataModule:
    return switch_on_datamodule(CASCADE_PLANS, "3d_cascade_fullres", results_dir=str(cascade_results))


@pytest.fixture(scope="module")
def cascade_batches(cascade_datamodule) -> list[dict]:
    seed_all(0)
    return [cascade_datamodule._dl_train.generate_train_batch() for _ in range(3)]


def cascade_pipeline(dm: NnUNetDataModule):
    view = recipe.trainer_view(dm.spec)
    return recipe.training_transforms(view, recipe.augmentation_params(view))


def test_the_workers_hand_over_the_previous_stage_as_the_second_target_channel(cascade_datamodule, cascade_batches):
    """As nnUNetDataLoader gives it to the transforms: target[:, 0] the label map, target[:, 1] the previous stage."""
    dm = cascade_datamodule
    assert dm._dl_train.transforms is None
    batch = cascade_batches[0]
    assert tuple(batch["target"].shape) == (batch["data"].shape[0], 2, *dm.aug.initial_patch_size)
    assert batch["target"].dtype == torch.int16
    assert not torch.equal(batch["target"][:, 0], batch["target"][:, 1])  # the stand-in is shifted
    out = DeviceAugmentation(cascade_pipeline(dm), seed=1)(dict(batch, data=batch["data"].clone(),
                                                               target=batch["target"].clone()))
    labels = len(dm.spec.plans_manager.get_label_manager(dm.spec.dataset_json).foreground_labels)
    assert tuple(out["data"].shape) == (batch["data"].shape[0], 1 + labels, *dm.patch_size)  # image + one-hot
    assert isinstance(out["target"], list) and out["target"][0].shape[1] == 1  # the previous stage moved out


def test_the_cascade_transforms_are_swapped_with_their_settings(cascade_datamodule):
    pipeline = cascade_pipeline(cascade_datamodule)
    device = leaves(to_device_pipeline(pipeline))
    library = leaves(pipeline)
    found = [t for t in library if isinstance(t, CASCADE_TRANSFORMS)]
    assert [type(t) for t in found] == list(CASCADE_TRANSFORMS)
    for a, b in zip(library, device):
        if isinstance(a, CASCADE_TRANSFORMS):
            assert type(b) is REWRITTEN[type(a)]
            assert repr(vars(a)) == repr(vars(b))
    probabilities = [t.apply_probability for t in to_device_pipeline(pipeline).transforms
                     if hasattr(t, "apply_probability") and isinstance(t.transform, CASCADE_TRANSFORMS)]
    assert probabilities == [0.4, 0.2]


def test_each_cascade_transform_equals_batchgeneratorsv2_on_the_same_draws(cascade_datamodule, cascade_batches):
    """Forced on, sample by sample: MoveSegAsOneHot, the random binary operator and the connected-component removal
    give the library's output bit for bit (the input of each is the library's output of the one before)."""
    pipeline = cascade_pipeline(cascade_datamodule)
    lib_leaves = [t for t in leaves(copy.deepcopy(pipeline)) if isinstance(t, CASCADE_TRANSFORMS)]
    dev_leaves = [to_device_pipeline(t) for t in leaves(copy.deepcopy(pipeline)) if isinstance(t, CASCADE_TRANSFORMS)]
    changed = [0, 0, 0]
    seed = 0
    for _ in range(4):
        for batch in cascade_batches:
            for b in range(batch["data"].shape[0]):
                sample = {"image": batch["data"][b].clone(), "segmentation": batch["target"][b].clone()}
                for i, (lib, dev) in enumerate(zip(lib_leaves, dev_leaves)):
                    seed += 1
                    seed_all(seed)
                    ref = lib(**{k: v.clone() for k, v in sample.items()})
                    seed_all(seed)
                    out = dev(**{k: v.clone() for k, v in sample.items()})
                    for key in ref:
                        assert_same(ref[key], out[key], f"{type(lib).__name__}.{key} seed {seed}")
                    assert lib.__dict__.get("channel_idx") == dev.__dict__.get("channel_idx")  # same shuffles
                    changed[i] += not torch.equal(ref["image"][:1], sample["image"][:1]) if i == 0 else \
                        not torch.equal(ref["image"], sample["image"])
                    sample = ref
    assert changed[1] > 0 and changed[2] > 0  # the morphology and the component removal did change the one-hot input


def test_the_cascade_batch_equals_nnunets_per_sample_pipeline(cascade_datamodule, cascade_batches):
    """DeviceAugmentation(seed=s) on a cascade batch == nnU-Net's is_cascaded pipeline per sample after seeding."""
    for s, batch in enumerate(cascade_batches * 4):
        assert_batch_parity(copy.deepcopy(cascade_pipeline(cascade_datamodule)), batch, 700 + s)


def test_the_cascade_trains_with_the_switch(cascade_results):
    from resenc_lightning.cli import main

    out = main(run_args(cascade_results, "3d_cascade_fullres", "0", "--data.augment_on_device", "true",
                        "--final_validation", "false", "--data.num_workers", "0"))
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    first_conv = next(v for k, v in ckpt["state_dict"].items() if k.endswith("weight") and v.ndim == 5)
    assert first_conv.shape[1] == 1 + 2  # the image + the one-hot previous stage (2 foreground labels)
    assert len(ckpt["NnUNetDataModule"]["device_augmentation"]) == 1


def test_the_shuffled_channel_order_is_part_of_the_checkpointed_stream(cascade_datamodule, cascade_batches):
    """The cascade's binary operator and component removal shuffle their channel list in place on every call (the
    library's `np.random.shuffle(self.channel_idx)`); a run restored from a state continues exactly as the original."""
    pipeline = cascade_pipeline(cascade_datamodule)
    a = DeviceAugmentation(pipeline, seed=11)

    def run(aug, batch):
        return aug(dict(batch, data=batch["data"].clone(), target=batch["target"].clone()))

    initial = [t.tolist() for t in a.state_dict()["channel_orders"]]
    assert len(initial) == 2
    for batch in cascade_batches * 10:  # until an order differs from the one a fresh pipeline starts with
        run(a, batch)
        state = a.state_dict()
        if [t.tolist() for t in state["channel_orders"]] != initial:
            break
    assert [t.tolist() for t in state["channel_orders"]] != initial
    b = DeviceAugmentation(cascade_pipeline(cascade_datamodule), seed=0)
    b.load_state_dict(torch.load(_saved(state), weights_only=True))
    for batch in cascade_batches * 2:
        x, y = run(a, batch), run(b, batch)
        assert_same(x["data"], y["data"], "data after restore")
        assert_same(x["target"], y["target"], "target after restore")


def _saved(state: dict):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_cascade_transforms_match_the_cpu_path_and_stay_on_the_device(cascade_datamodule, cascade_batches):
    """Forced on, same seeds: CUDA output == CPU output, except the binary operator's FFT convolution, whose rounding
    on another FFT kernel may flip a voxel at the threshold (< 0.1% of voxels). The batch stays on the device."""
    cuda = torch.device("cuda")
    pipeline = cascade_pipeline(cascade_datamodule)
    on_cpu = [to_device_pipeline(t) for t in leaves(copy.deepcopy(pipeline)) if isinstance(t, CASCADE_TRANSFORMS)]
    on_gpu = [to_device_pipeline(t) for t in leaves(copy.deepcopy(pipeline)) if isinstance(t, CASCADE_TRANSFORMS)]
    seed = 0
    for batch in cascade_batches:
        for b in range(batch["data"].shape[0]):
            sample = {"image": batch["data"][b].clone(), "segmentation": batch["target"][b].clone()}
            for cpu_t, gpu_t in zip(on_cpu, on_gpu):
                seed += 1
                seed_all(seed)
                ref = cpu_t(**{k: v.clone() for k, v in sample.items()})
                seed_all(seed)
                out = gpu_t(**{k: v.to(cuda) for k, v in sample.items()})
                for key in ref:
                    assert out[key].device.type == "cuda" and out[key].dtype == ref[key].dtype, key
                    differ = (out[key].cpu() != ref[key]).float().mean()
                    assert differ == 0 or (isinstance(cpu_t, ApplyRandomBinaryOperatorTransform) and differ < 1e-3)
                sample = ref
    aug = DeviceAugmentation(pipeline, seed=3)
    out = aug({k: v.to(cuda) if torch.is_tensor(v) else v for k, v in cascade_batches[0].items()})
    assert out["data"].device.type == "cuda" and all(t.device.type == "cuda" for t in out["target"])
