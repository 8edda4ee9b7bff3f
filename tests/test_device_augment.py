"""`--data.augment_on_device`: nnU-Net's training transforms on the device, proven on the CPU.

Parity: with the same random draws on the same input, each transform of the device path gives what
batchgeneratorsv2's per-sample path gives (exactly), and so does the whole pipeline on a real batch.
Distributions: over 10,000 draws the device path's parameters follow nnU-Net's settings.
Training: the switch trains through `main([...])`, and a resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform, blur_dimension
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform
from conftest import TINY_ID, TINY_PLANS, tiny_args

from resenc_lightning import recipe
from resenc_lightning.data import NnUNetDataModule
from resenc_lightning.device_augment import (
    REWRITTEN,
    AugmentationStream,
    DeviceAugmentation,
    DeviceSpatialTransform,
    to_device_pipeline,
)
from resenc_lightning.plans import resolve_run


def seed_all(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


def leaves(pipeline: ComposeTransforms) -> list:
    """The pipeline's transforms in order, each without its RandomTransform wrapper (so it always fires)."""
    return [t.transform if isinstance(t, RandomTransform) else t for t in pipeline.transforms]


def library_reference(pipeline: ComposeTransforms) -> ComposeTransforms:
    """nnU-Net's pipeline with the blur's timing-based FFT/direct choice fixed to direct (see DeviceGaussianBlur)."""
    ref = copy.deepcopy(pipeline)
    for t in leaves(ref):
        if isinstance(t, GaussianBlurTransform):
            t.benchmark = False
    return ref


def assert_same(a, b, where: str) -> None:
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
        return
    assert a.shape == b.shape and a.dtype == b.dtype, (where, a.shape, b.shape, a.dtype, b.dtype)
    assert torch.equal(a, b), (where, (a.float() - b.float()).abs().max())


@pytest.fixture(scope="module")
def datamodule(tiny_dataset):
    dm = NnUNetDataModule(plans=TINY_PLANS, dataset=str(TINY_ID), configuration="3d_fullres", fold="0",
                          augment_on_device=True, num_workers=0)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def raw_batches(datamodule) -> list[dict]:
    """What the CPU workers hand over with the switch on: nnU-Net's crops at the initial patch size, untransformed."""
    seed_all(0)
    return [datamodule._dl_train.generate_train_batch() for _ in range(4)]


@pytest.fixture(scope="module")
def pipeline(datamodule) -> ComposeTransforms:
    view = recipe.trainer_view(datamodule.spec)
    return recipe.training_transforms(view, recipe.augmentation_params(view))


def test_workers_only_load_and_crop_at_the_initial_patch_size(datamodule, raw_batches):
    aug = datamodule.aug
    assert datamodule._dl_train.transforms is None
    batch = raw_batches[0]
    assert tuple(batch["data"].shape[2:]) == aug.initial_patch_size != datamodule.patch_size
    assert batch["data"].dtype == torch.float32 and batch["target"].dtype == torch.int16
    assert tuple(batch["target"].shape) == (batch["data"].shape[0], 1, *aug.initial_patch_size)


def test_the_device_pipeline_is_nnunets_with_three_transforms_swapped(pipeline):
    """Same order, probabilities and settings as nnU-Net's object; only the classes of three transforms differ."""
    device = to_device_pipeline(pipeline)
    assert len(pipeline.transforms) == len(device.transforms)
    for a, b in zip(pipeline.transforms, device.transforms):
        assert type(a) is type(b) or isinstance(a, tuple(REWRITTEN))
        if isinstance(a, RandomTransform):
            assert a.apply_probability == b.apply_probability
            a, b = a.transform, b.transform
        assert type(b) is REWRITTEN.get(type(a), type(a))
        skip = ("_grid_cache", "benchmark", "benchmark_use_fft")
        assert repr({k: v for k, v in vars(a).items() if k not in skip}) == \
            repr({k: v for k, v in vars(b).items() if k not in skip})
    assert sum(type(t) in REWRITTEN.values() for t in leaves(device)) == 2  # spatial, blur (no regions here)


def test_each_transform_equals_batchgeneratorsv2_on_the_same_draws(pipeline, raw_batches):
    """Every transform forced on, sample by sample and seed by seed: the device path's output is the library's, bit
    for bit. The input of each transform is the library's output of the one before, so every stage sees real data."""
    lib_leaves = leaves(library_reference(pipeline))
    dev_leaves = leaves(to_device_pipeline(pipeline))
    forced_spatial = copy.copy(lib_leaves[0])
    forced_spatial.p_rotation = forced_spatial.p_scaling = 1.0  # the grid path every time, not only 20% / 20%
    lib_leaves = [forced_spatial, *lib_leaves]
    dev_leaves = [to_device_pipeline(forced_spatial), *dev_leaves]
    seed = 0
    for batch in raw_batches:
        for b in range(batch["data"].shape[0]):
            sample = {"image": batch["data"][b].clone(), "segmentation": batch["target"][b].clone()}
            for i, (lib, dev) in enumerate(zip(lib_leaves, dev_leaves)):
                if i == 1:  # restart from the raw crop for nnU-Net's own (random) spatial transform
                    sample = {"image": batch["data"][b].clone(), "segmentation": batch["target"][b].clone()}
                seed += 1
                seed_all(seed)
                ref = lib(**{k: v.clone() if torch.is_tensor(v) else v for k, v in sample.items()})
                seed_all(seed)
                out = dev(**{k: v.clone() if torch.is_tensor(v) else v for k, v in sample.items()})
                for key in ref:
                    assert_same(ref[key], out[key], f"{type(lib).__name__}.{key} seed {seed}")
                sample = ref


@pytest.mark.parametrize("labels", [(0, 1), (0, 3, 5, 7)])
def test_spatial_segmentation_paths_equal_the_library(labels):
    """Both of SpatialTransform's argmax branches (two labels; three or more with nearest-neighbour tie-breaks) and the
    padding label (zoomed out past the image), exactly."""
    shape = (1, 24, 22, 20)
    for seed in range(30):
        lib = SpatialTransform((16, 16, 16), 0, False, p_rotation=1, rotation=(-0.5, 0.5), p_scaling=1,
                               scaling=(0.7, 1.4), p_synchronize_scaling_across_axes=1, border_mode_seg="constant",
                               padding_value_seg=-1)
        dev = DeviceSpatialTransform.from_library(lib)
        g = torch.Generator().manual_seed(seed)
        seg = torch.tensor(labels, dtype=torch.int16)[torch.randint(0, len(labels), shape, generator=g)]
        seg = torch.nn.functional.interpolate(seg[None].float(), scale_factor=0.25, mode="nearest")
        seg = torch.nn.functional.interpolate(seg, size=shape[1:], mode="nearest")[0].to(torch.int16)
        img = torch.randn(shape, generator=g)
        seed_all(seed)
        ref = lib(image=img.clone(), segmentation=seg.clone())
        seed_all(seed)
        out = dev(image=img.clone(), segmentation=seg.clone())
        assert_same(ref["image"], out["image"], f"image seed {seed}")
        assert_same(ref["segmentation"], out["segmentation"], f"seg seed {seed}")


def test_regions_transform_equals_the_library():
    lib = ConvertSegmentationToRegionsTransform([[1, 2], 2, [3]], channel_in_seg=0)
    dev = to_device_pipeline(lib)
    seg = torch.randint(0, 4, (1, 8, 9, 10), dtype=torch.int16)
    assert_same(lib(segmentation=seg.clone())["segmentation"], dev(segmentation=seg.clone())["segmentation"], "regions")


def test_the_whole_batch_equals_nnunets_per_sample_pipeline(pipeline, raw_batches):
    """DeviceAugmentation(seed=s) on a batch == np.random.seed(s); torch.manual_seed(s); nnU-Net's pipeline per sample."""
    ref_pipeline = library_reference(pipeline)
    for s, batch in enumerate(raw_batches * 3):
        aug = DeviceAugmentation(pipeline, seed=100 + s)
        out = aug({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
        seed_all(100 + s)
        samples = [ref_pipeline(image=batch["data"][b].clone(), segmentation=batch["target"][b].clone())
                   for b in range(batch["data"].shape[0])]
        assert_same(torch.stack([x["image"] for x in samples]), out["data"], f"data batch {s}")
        ref_target = [torch.stack([x["segmentation"][i] for x in samples]) for i in range(len(samples[0]["segmentation"]))]
        assert_same(ref_target, out["target"], f"target batch {s}")
        assert out["keys"] is batch["keys"]


def test_the_stream_is_the_augmentations_own(pipeline, raw_batches):
    """The global generators are left where they were, and two augmentations with one seed draw the same."""
    seed_all(7)
    before = (np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    a, b = DeviceAugmentation(pipeline, seed=3), DeviceAugmentation(pipeline, seed=3)
    batch = raw_batches[1]
    out_a = a({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
    assert np.array_equal(np.random.get_state()[1], before[0]) and torch.equal(torch.get_rng_state(), before[1])
    b.load_state_dict(AugmentationStream(3).state_dict())
    out_b = b({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
    assert_same(out_a["data"], out_b["data"], "same seed")
    state = a.state_dict()
    c = DeviceAugmentation(pipeline, seed=99)
    c.load_state_dict(state)
    assert_same(a(dict(batch, data=batch["data"].clone(), target=batch["target"].clone()))["data"],
                c(dict(batch, data=batch["data"].clone(), target=batch["target"].clone()))["data"], "restored stream")


def test_fft_and_direct_blur_agree_within_float_rounding():
    """nnU-Net's blur picks FFT or direct convolution by timing; the device path always takes direct. Both compute
    the same blur: they differ by float rounding only (the stated tolerance, 1e-5 on unit-scale data)."""
    img = torch.randn((1, 24, 22, 20), generator=torch.Generator().manual_seed(0))
    for sigma in (0.5, 0.75, 1.0):
        for d in range(3):
            direct = blur_dimension(img, sigma, d, force_use_fft=False)
            fft = blur_dimension(img, sigma, d, force_use_fft=True)
            assert torch.allclose(direct, fft, atol=1e-5, rtol=0)


def test_unchecked_transforms_are_refused():
    from batchgeneratorsv2.transforms.noise.median_filter import MedianFilterTransform

    with pytest.raises(NotImplementedError, match="MedianFilterTransform"):
        to_device_pipeline(ComposeTransforms([MedianFilterTransform((1, 2))]))


def test_spec_and_view_constructors_agree(datamodule, pipeline):
    aug = DeviceAugmentation.from_spec(resolve_run(TINY_PLANS, str(TINY_ID), "3d_fullres", "0"), seed=1)
    assert [type(t) for t in aug.transforms.transforms] == [type(t) for t in to_device_pipeline(pipeline).transforms]
    assert tiny_args  # keep the import used by the training tests below
