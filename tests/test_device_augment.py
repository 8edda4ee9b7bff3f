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
from conftest import TINY_ID, TINY_PLANS, stop_at_step_and_resume, tiny_args
from test_ddp import b3_plans  # noqa: F401  (fixture)

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


def switch_on_datamodule(plans: str, configuration: str, **kwargs) -> NnUNetDataModule:
    """Fold 0 of the tiny dataset with the switch on and the loader in-process, set up for fit."""
    dm = NnUNetDataModule(plans=plans, dataset=str(TINY_ID), configuration=configuration, fold="0",
                          augment_on_device=True, num_workers=0, **kwargs)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def datamodule(tiny_dataset):
    return switch_on_datamodule(TINY_PLANS, "3d_fullres")


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


def test_the_device_pipeline_is_nnunets_with_some_transforms_swapped(pipeline):
    """Same order, probabilities and settings as nnU-Net's object; only the classes of the rewritten ones differ."""
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
    # spatial, blur, and the three that draw on the device: noise, contrast, gamma (twice); no regions here
    assert sum(type(t) in REWRITTEN.values() for t in leaves(device)) == 6


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


# -- anisotropic (dummy 2D) and 2D pipelines ---------------------------------------------------------------------------


def assert_batch_parity(pipeline: ComposeTransforms, batch: dict, seed: int) -> None:
    aug = DeviceAugmentation(pipeline, seed=seed)
    out = aug({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
    ref_pipeline = library_reference(pipeline)
    seed_all(seed)
    samples = [ref_pipeline(image=batch["data"][b].clone(), segmentation=batch["target"][b].clone())
               for b in range(batch["data"].shape[0])]
    assert_same(torch.stack([x["image"] for x in samples]), out["data"], f"data seed {seed}")
    segs = [x["segmentation"] for x in samples]
    ref = [torch.stack([x[i] for x in segs]) for i in range(len(segs[0]))] if isinstance(segs[0], list) \
        else torch.stack(segs)
    assert_same(ref, out["target"], f"target seed {seed}")


def test_dummy_2d_pipeline_equals_the_library(datamodule, raw_batches):
    """nnU-Net's anisotropic branch (Convert3DTo2D, 2D rotation over 180 degrees, low-res ignoring axis 0), exactly."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    view = recipe.trainer_view(datamodule.spec)
    patch = (8, 16, 16)
    pipeline = nnUNetTrainer.get_training_transforms(
        patch, (-np.pi, np.pi), recipe.deep_supervision_scales(view), (0, 1, 2), True,
        use_mask_for_norm=view.configuration_manager.use_mask_for_norm, is_cascaded=False,
        foreground_labels=view.label_manager.foreground_labels, regions=None, ignore_label=None)
    assert type(pipeline.transforms[0]).__name__ == "Convert3DTo2DTransform"
    for s, batch in enumerate(raw_batches * 2):
        x0 = (batch["data"].shape[2] - patch[0]) // 2  # nnU-Net's initial patch keeps axis 0 at the patch size
        crop = dict(batch, data=batch["data"][:, :, x0:x0 + patch[0]], target=batch["target"][:, :, x0:x0 + patch[0]])
        assert_batch_parity(pipeline, crop, 300 + s)


@pytest.mark.parametrize("ignore_label", [None, 2])
def test_regions_and_ignore_label_pipeline_equals_the_library(datamodule, raw_batches, ignore_label):
    """nnU-Net's region branch (and the ignore label converted with the regions) on real batches, exactly."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    view = recipe.trainer_view(datamodule.spec)
    aug = recipe.augmentation_params(view)
    pipeline = nnUNetTrainer.get_training_transforms(
        view.configuration_manager.patch_size, aug.rotation_for_da, recipe.deep_supervision_scales(view),
        aug.mirror_axes, False, use_mask_for_norm=None, is_cascaded=False, foreground_labels=[1, 2],
        regions=[(1, 2), (1,)], ignore_label=ignore_label)
    assert type(leaves(pipeline)[-2]) is ConvertSegmentationToRegionsTransform
    for s, batch in enumerate(raw_batches):
        assert_batch_parity(pipeline, batch, 500 + s)


def test_2d_configuration_pipeline_equals_the_library(tiny_dataset):
    dm = NnUNetDataModule(plans=TINY_PLANS, dataset=str(TINY_ID), configuration="2d", fold="0",
                          augment_on_device=True, num_workers=0)
    dm.setup("fit")
    view = recipe.trainer_view(dm.spec)
    pipeline = recipe.training_transforms(view, recipe.augmentation_params(view))
    seed_all(1)
    for s in range(8):
        batch = dm._dl_train.generate_train_batch()
        assert batch["data"].ndim == 4
        assert_batch_parity(pipeline, batch, 400 + s)


# -- parameter distributions ---------------------------------------------------------------------------------------

N_DRAWS = 10_000
ALPHA = 1e-3  # fixed seed: the verdicts are reproducible; a correct sampler fails a test with probability 1e-3


def bg_contrast_cdf(lo: float, hi: float):
    """BGContrast((lo, hi)): with probability 1/2 uniform on (lo, 1), else uniform on (1, hi)."""
    def cdf(x):
        x = np.asarray(x, dtype=float)
        return np.where(x < 1, 0.5 * np.clip((x - lo) / (1 - lo), 0, 1), 0.5 + 0.5 * np.clip((x - 1) / (hi - 1), 0, 1))
    return cdf


def uniform_cdf(lo: float, hi: float):
    from scipy.stats import uniform

    return uniform(lo, hi - lo).cdf


def assert_fires(k: int, n: int, p: float, what: str) -> None:
    from scipy.stats import binomtest

    assert binomtest(k, n, p).pvalue > ALPHA, f"{what}: {k}/{n} against p={p}"


def assert_distributed(values, cdf, what: str) -> None:
    from scipy.stats import kstest

    values = np.asarray(values, dtype=float).ravel()
    assert len(values) > 100, what
    assert kstest(values, cdf).pvalue > ALPHA, what


def draw_parameters(device: ComposeTransforms, n: int) -> dict[str, list]:
    img, seg = torch.zeros((2, 8, 8, 8)), torch.zeros((1, 8, 8, 8), dtype=torch.int16)
    records: dict[str, list] = {}
    seed_all(2024)
    for _ in range(n):
        for t in device.transforms:
            inner = t.transform if isinstance(t, RandomTransform) else t
            name = (type(inner).__mro__[1] if type(inner) in REWRITTEN.values() else type(inner)).__name__
            if isinstance(t, RandomTransform):
                name += f"(p={t.apply_probability})"
                fired = t.get_parameters()["apply_transform"]
                params = t.transform.get_parameters(image=img, segmentation=seg) if fired else None
            else:
                params = t.get_parameters(image=img, segmentation=seg)
            records.setdefault(name, []).append(params)
    return records


@pytest.fixture(scope="module")
def draws(pipeline):
    """10,000 parameter draws of the device pipeline (nnU-Net's 3D branch) on a 2-channel sample, in pipeline order:
    each RandomTransform's coin, then the transform's own parameters (its get_parameters, as ComposeTransforms calls
    it). The spatial transform's angles and scales are read where it builds its affine matrix."""
    from resenc_lightning import device_augment

    spatial: list = []
    original = device_augment.create_affine_matrix_3d

    def recording(angles, scales):
        spatial.append((list(angles), list(scales)))
        return original(angles, scales)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(device_augment, "create_affine_matrix_3d", recording)
        # the grid's values are not drawn: a 1-voxel base grid keeps 10,000 draws fast (the parity tests check grids)
        mp.setattr(DeviceSpatialTransform, "_base_grid", lambda self, device: torch.zeros((1, 1, 1, 3)))
        records = draw_parameters(to_device_pipeline(pipeline), N_DRAWS)
    records["spatial"] = spatial
    return records


#: nnU-Net's get_training_transforms (nnunetv2 2.x), 3D isotropic branch: what the draws must follow.
NNUNET_PROBABILITIES = {
    "GaussianNoiseTransform(p=0.1)": 0.1, "GaussianBlurTransform(p=0.2)": 0.2,
    "MultiplicativeBrightnessTransform(p=0.15)": 0.15, "ContrastTransform(p=0.15)": 0.15,
    "SimulateLowResolutionTransform(p=0.25)": 0.25, "GammaTransform(p=0.1)": 0.1, "GammaTransform(p=0.3)": 0.3,
}


def test_each_transform_fires_with_nnunets_probability(draws):
    for name, p in NNUNET_PROBABILITIES.items():
        fired = [d is not None for d in draws[name]]
        assert len(fired) == N_DRAWS
        assert_fires(sum(fired), N_DRAWS, p, name)


def test_spatial_parameters_follow_nnunets(draws, datamodule):
    """Rotation with p 0.2 and scaling with p 0.2, independently; angles uniform on nnU-Net's +-30 degrees, each axis
    its own; one scale for all axes, uniform on (0.7, 1.4)."""
    spatial = draws["spatial"]
    rotated = [a for a, _ in spatial if any(x != 0 for x in a)]
    scaled = [s[0] for _, s in spatial if s != [1, 1, 1]]
    both = sum(1 for a, s in spatial if any(x != 0 for x in a) and s != [1, 1, 1])
    assert_fires(len(rotated), N_DRAWS, 0.2, "rotation")
    assert_fires(len(scaled), N_DRAWS, 0.2, "scaling")
    assert_fires(both, N_DRAWS, 0.04, "rotation and scaling together")
    lo, hi = datamodule.aug.rotation_for_da
    assert (lo, hi) == pytest.approx((-np.pi / 6, np.pi / 6))
    angles = np.array(rotated)
    for axis in range(3):
        assert_distributed(angles[:, axis], uniform_cdf(lo, hi), f"angle axis {axis}")
    assert abs(np.corrcoef(angles[:, 0], angles[:, 1])[0, 1]) < 0.1  # per axis, not one angle for all
    assert all(s[0] == s[1] == s[2] for _, s in spatial)
    assert_distributed(scaled, uniform_cdf(0.7, 1.4), "scale")


def test_intensity_parameters_follow_nnunets(draws):
    noise = [d for d in draws["GaussianNoiseTransform(p=0.1)"] if d is not None]
    assert all(d["num_apply"] == 2 for d in noise)  # p_per_channel 1, one sigma for both channels
    assert_distributed([d["sigmas"] for d in noise], uniform_cdf(0, 0.1), "noise")

    blur = [d for d in draws["GaussianBlurTransform(p=0.2)"] if d is not None]
    channels = np.array([d["apply_to_channel"].numpy() for d in blur])
    for c in range(2):
        assert_fires(int(channels[:, c].sum()), len(blur), 0.5, f"blur channel {c}")
    sigmas = np.array([s for d in blur for s in d["sigmas"]])  # per blurred channel: one sigma per axis
    assert sigmas.shape[1] == 3 and not np.any(sigmas[:, 0] == sigmas[:, 1])
    assert_distributed(sigmas, uniform_cdf(0.5, 1.0), "blur sigma")

    for name in ("MultiplicativeBrightnessTransform(p=0.15)", "ContrastTransform(p=0.15)"):
        fired = [d for d in draws[name] if d is not None]
        multipliers = np.array([d["multipliers"].numpy() for d in fired])
        assert multipliers.shape == (len(fired), 2)  # every channel, each its own factor
        assert not np.any(multipliers[:, 0] == multipliers[:, 1])
        assert_distributed(multipliers, bg_contrast_cdf(0.75, 1.25), name)

    lowres = [d for d in draws["SimulateLowResolutionTransform(p=0.25)"] if d is not None]
    assert_fires(sum(len(d["apply_to_channel"]) for d in lowres), 2 * len(lowres), 0.5, "low-res channels")
    scales = np.concatenate([d["scales"].numpy() for d in lowres if len(d["scales"])])
    assert np.all(scales == scales[:, :1])  # one scale for all axes (none ignored in 3D)
    assert_distributed(scales[:, 0], uniform_cdf(0.5, 1.0), "low-res scale")

    for name, inverted in (("GammaTransform(p=0.1)", True), ("GammaTransform(p=0.3)", False)):
        fired = [d for d in draws[name] if d is not None]
        assert all(bool(d["invert_image"].all()) is inverted and bool(d["invert_image"].any()) is inverted
                   for d in fired)
        assert all(bool(d["retain_stats"].all()) for d in fired)
        gammas = np.array([d["gamma"].numpy() for d in fired])
        assert gammas.shape == (len(fired), 2)
        assert_distributed(gammas, bg_contrast_cdf(0.7, 1.5), name)


def test_mirroring_flips_each_allowed_axis_with_probability_one_half(draws):
    axes = [d["axes"] for d in draws["MirrorTransform"]]
    assert len(axes) == N_DRAWS
    for axis in (0, 1, 2):
        assert_fires(sum(axis in a for a in axes), N_DRAWS, 0.5, f"mirror axis {axis}")
    assert_fires(sum(a == [0, 1, 2] for a in axes), N_DRAWS, 0.125, "all three axes together")


def test_the_spatial_draws_are_the_librarys_for_10000_seeds(pipeline):
    """The one rewritten sampler: on the same draws, the same affine matrix and centre as SpatialTransform."""
    lib = copy.copy(leaves(pipeline)[0])
    lib.patch_size, lib._grid_cache = (4, 4, 3), {}  # small grids: the draws do not depend on the patch
    dev = DeviceSpatialTransform.from_library(lib)
    img = torch.zeros((1, 20, 20, 20))
    seed_all(77)
    ref = [lib.get_parameters(image=img) for _ in range(N_DRAWS)]
    seed_all(77)
    out = [dev.get_parameters(image=img) for _ in range(N_DRAWS)]
    for r, o in zip(ref, out):
        assert r["center_location_in_pixels"] == o["center_location_in_pixels"]
        assert (r["affine"] is None) == (o["affine"] is None)
        if r["affine"] is not None:
            assert np.array_equal(r["affine"], o["affine"]) and torch.equal(r["grid"], o["grid"])


# -- on a GPU (skipped without one) ----------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda_only
def test_on_cuda_each_transform_matches_the_cpu_path(pipeline, raw_batches):
    """Each device transform on CUDA vs the same transform on the CPU: images within 1e-4 (different interpolation /
    convolution / reduction kernels; the blur in fp32, not TF32), labels differing on < 0.1% of voxels (interpolation
    ties). One seed per sample, not per transform: by the generator rule every draw, Gaussian noise's field included,
    comes from the CPU generators, so the CUDA chain draws what the CPU chain draws, in order, and ends the streams
    where the CPU chain ends them. (Reseeding before each transform hid noise drawn from the CUDA generator.)"""
    cuda = torch.device("cuda")
    dev_leaves = leaves(to_device_pipeline(pipeline))
    forced = copy.copy(leaves(pipeline)[0])
    forced.p_rotation = forced.p_scaling = 1.0
    dev_leaves = [to_device_pipeline(forced), *dev_leaves]
    cuda_generator = torch.cuda.get_rng_state(cuda)
    seed = 0
    for batch in raw_batches[:2]:
        for b in range(batch["data"].shape[0]):
            raw = {"image": batch["data"][b].clone(), "segmentation": batch["target"][b].clone()}
            seed += 1
            seed_all(seed)
            steps, sample = [], raw
            for i, t in enumerate(dev_leaves):  # the CPU chain; leaf 1 (nnU-Net's spatial) restarts from the crop
                sample = raw if i == 1 else sample
                inputs = {k: v.clone() if torch.is_tensor(v) else v for k, v in sample.items()}
                sample = t(**{k: v.clone() if torch.is_tensor(v) else v for k, v in sample.items()})
                steps.append((inputs, sample))
            cpu_end = (np.random.get_state()[1].copy(), np.random.get_state()[2], torch.get_rng_state())
            seed_all(seed)
            for t, (inputs, ref) in zip(dev_leaves, steps):  # each CUDA step from the CPU step's input: no drift
                out = t(**{k: v.to(cuda) if torch.is_tensor(v) else v for k, v in inputs.items()})
                name = type(t).__name__
                for x, y in zip(*(v if isinstance(v, list) else [v] for v in (ref["image"], out["image"]))):
                    assert y.device.type == "cuda" and torch.allclose(x, y.cpu(), atol=1e-4), name
                segs = zip(*(v if isinstance(v, list) else [v] for v in (ref["segmentation"], out["segmentation"])))
                for x, y in segs:
                    assert x.dtype == y.dtype and (x != y.cpu()).float().mean() < 1e-3, name
            assert np.array_equal(np.random.get_state()[1], cpu_end[0]) and np.random.get_state()[2] == cpu_end[1]
            assert torch.equal(torch.get_rng_state(), cpu_end[2]), f"torch CPU stream, seed {seed}"
    assert torch.equal(torch.cuda.get_rng_state(cuda), cuda_generator)  # never drawn from


@cuda_only
def test_on_cuda_the_batch_is_augmented_on_the_device_and_the_globals_are_untouched(pipeline, raw_batches):
    cuda = torch.device("cuda")
    aug = DeviceAugmentation(pipeline, seed=1)
    states = (torch.get_rng_state(), torch.cuda.get_rng_state(cuda), np.random.get_state()[1].copy())
    batch = raw_batches[0]
    out = aug({k: v.to(cuda) if torch.is_tensor(v) else v for k, v in batch.items()})
    assert out["data"].device.type == "cuda" and all(t.device.type == "cuda" for t in out["target"])
    assert torch.equal(states[0], torch.get_rng_state()) and torch.equal(states[1], torch.cuda.get_rng_state(cuda))
    assert np.array_equal(states[2], np.random.get_state()[1])
    state = aug.state_dict()
    assert "cuda" not in state  # the generator rule: nothing to keep of the CUDA generator
    on_cpu = DeviceAugmentation(pipeline, seed=1)
    on_cpu({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
    assert torch.equal(on_cpu.state_dict()["torch"], state["torch"])  # same draws on either device
    assert torch.equal(on_cpu.state_dict()["numpy"]["keys"], state["numpy"]["keys"])
    assert on_cpu.state_dict()["numpy"]["pos"] == state["numpy"]["pos"]
    again = DeviceAugmentation(pipeline, seed=2)
    again.load_state_dict(state)
    x = aug({k: v.to(cuda) if torch.is_tensor(v) else v for k, v in batch.items()})
    y = again({k: v.to(cuda) if torch.is_tensor(v) else v for k, v in batch.items()})
    assert torch.allclose(x["data"], y["data"]) and torch.equal(x["target"][0], y["target"][0])


# -- the switch in training ------------------------------------------------------------------------------------------

QUIET = ("--final_validation", "false", "--nnunet_export.plot_progress", "false")


def test_the_switch_trains_on_cpu_and_checkpoints_its_stream(tiny_dataset, results_dir):
    from resenc_lightning.cli import main

    out = main(tiny_args(results_dir, "--data.augment_on_device", "true", *QUIET, epochs=2, iters=3, val_iters=2))
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6 and len(ckpt["nnunet"]["logging"]["train_losses"]) == 2
    streams = ckpt["NnUNetDataModule"]["device_augmentation"]
    assert len(streams) == 1 and set(streams[0]) >= {"seed", "numpy", "torch"}


def test_validation_batches_and_the_switch_off_are_untouched(datamodule, raw_batches, tiny_dataset):
    from types import SimpleNamespace

    batch = raw_batches[0]
    datamodule.trainer = SimpleNamespace(training=False)
    try:
        assert datamodule.on_after_batch_transfer(batch, 0) is batch
        datamodule.trainer.training = True
        out = datamodule.on_after_batch_transfer(dict(batch, data=batch["data"].clone(), target=batch["target"].clone()), 0)
        assert tuple(out["data"].shape[2:]) == datamodule.patch_size and isinstance(out["target"], list)
    finally:
        datamodule.trainer = None
    off = NnUNetDataModule(plans=TINY_PLANS, dataset=str(TINY_ID), configuration="3d_fullres", fold="0", num_workers=0)
    off.setup("fit")
    assert off.device_augmentation is None and off.state_dict() == {}
    assert isinstance(off._dl_train.transforms, ComposeTransforms)


def test_each_rank_draws_its_own_stream(tiny_dataset):
    from types import SimpleNamespace

    seeds = []
    for rank in (0, 1):
        dm = NnUNetDataModule(plans=TINY_PLANS, dataset=str(TINY_ID), configuration="3d_fullres", fold="0",
                              augment_on_device=True, num_workers=0, seed=5)
        dm.trainer = SimpleNamespace(global_rank=rank)
        dm.setup("fit")
        dm.trainer = None
        seeds.append(dm.device_augmentation.stream.seed)
    assert seeds[0] != seeds[1]


def test_sigterm_mid_epoch_then_resume_with_the_switch_ends_bit_identical(tiny_dataset, tmp_path):
    """As tests/test_reliability.py's test for the CPU path, with --data.augment_on_device true: the checkpoint holds
    the augmentation's stream, so the resumed run augments the remaining batches exactly as the uninterrupted one."""
    a, b, mid, _ = stop_at_step_and_resume(tmp_path, "--data.augment_on_device", "true", step=7)
    assert mid["global_step"] == 7
    assert a["global_step"] == b["global_step"] == 10
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert a["nnunet"]["logging"]["val_losses"] == b["nnunet"]["logging"]["val_losses"]
    sa, sb = a["NnUNetDataModule"]["device_augmentation"][0], b["NnUNetDataModule"]["device_augmentation"][0]
    assert torch.equal(sa["torch"], sb["torch"]) and torch.equal(sa["numpy"]["keys"], sb["numpy"]["keys"])


def test_two_process_ddp_each_rank_checkpoints_and_resumes_its_own_stream(b3_plans, pipeline, datamodule,  # noqa: F811
                                                                           tmp_path):
    """Under DDP (gloo, CPU) each rank's stream is seeded from (run seed, rank), every rank's stream is gathered into the
    checkpoint, and on --resume each rank continues its own: after epoch 1 each rank's stream is exactly its epoch-0
    stream advanced by that rank's 3 batches (the number of draws depends on shapes only, not on the data)."""
    from test_ddp import run_ddp

    from resenc_lightning.device_augment import device_seed

    def streams(results_dir):
        out = results_dir / f"Dataset{TINY_ID}_Tiny" / f"nnUNetTrainer_Lightning__{b3_plans}__3d_fullres" / "fold_0"
        ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        return ckpt["NnUNetDataModule"]["device_augmentation"]

    flags = ("--data.augment_on_device", "true", "--final_validation", "false", "--model.num_epochs", "2")
    run_ddp(tmp_path / "r", tmp_path / "p0", *flags, epochs=1, plans=b3_plans)
    first = streams(tmp_path / "r")
    run_ddp(tmp_path / "r", tmp_path / "p1", *flags, "--resume", "true", epochs=2, plans=b3_plans)
    second = streams(tmp_path / "r")
    assert [s["seed"] for s in first] == [device_seed(123, 0), device_seed(123, 1)]  # tiny_args: --seed_everything 123
    for rank, batch_size in ((0, 2), (1, 1)):  # nnU-Net's split of the global batch 3
        expected = DeviceAugmentation(pipeline, seed=0)
        expected.load_state_dict(first[rank])
        shape = (batch_size, 1, *datamodule.aug.initial_patch_size)
        for _ in range(3):
            expected({"data": torch.zeros(shape), "target": torch.zeros(shape, dtype=torch.int16)})
        state, got = expected.state_dict(), second[rank]
        assert torch.equal(state["torch"], got["torch"]), rank
        assert torch.equal(state["numpy"]["keys"], got["numpy"]["keys"]) and state["numpy"]["pos"] == got["numpy"]["pos"]
