"""nnU-Net's training augmentation on the training device (`--data.augment_on_device true`).

Interface (stable; the benchmark script uses it):

    aug = DeviceAugmentation.from_spec(spec, enable_deep_supervision=True, seed=None)  # or .from_view(view, seed=)
    batch = aug(batch)   # {'data': (B, C, *initial_patch), 'target': (B, 1, *initial_patch), ...} on the device
                         #   (cascade: 'target' (B, 2, ...), the previous stage's segmentation in channel 1)
                         # -> 'data' (B, C, *patch); 'target' the deep-supervision list (or one tensor), as
                         #    nnU-Net's get_training_transforms + nnUNetDataLoader give them
    aug.state_dict() / aug.load_state_dict(state)   # its random stream, for checkpoints

The pipeline is nnU-Net's own `get_training_transforms` object for the run's plans (built by `recipe.training_transforms`,
so order, probabilities and ranges are nnU-Net's by construction), run per sample over the batch exactly as
`nnUNetDataLoader.generate_train_batch` runs it, but on tensors that are already on the device. batchgeneratorsv2's
transforms are reused as they are wherever they run on any device; the others are swapped for device versions that
keep their parameters (same attributes, same random draws in the same order) and change only where tensors are made:

- `SpatialTransform`: its grid is built on the CPU (`get_parameters`), and its segmentation path reads the labels with
  `.numpy()` / `pd.unique` and allocates its buffers on the CPU. -> `DeviceSpatialTransform`.
- `GaussianBlurTransform`: its kernel is made by `torch.linspace` on the CPU, and `benchmark=True` picks FFT or direct
  convolution by unsynchronised wall-clock timing. -> `DeviceGaussianBlurTransform` (kernel on the device, always the
  direct convolution).
- `ConvertSegmentationToRegionsTransform`: its region label tensors live on the CPU and are compared with the
  segmentation (1-element tensors, not scalars). -> `DeviceRegionsTransform`.
- the cascade's `MoveSegAsOneHotToDataTransform`: allocates the image with the one-hot channels by `torch.empty`
  without a device (on the CPU). -> `DeviceMoveSegAsOneHotTransform` (allocated on the image's device).
- the cascade's `ApplyRandomBinaryOperatorTransform`: its structuring element is `torch.from_numpy(ball(r))`, on the
  CPU. -> `DeviceBinaryOperatorTransform` (the same element moved to the image's device).
- the cascade's `RemoveRandomConnectedComponentFromOneHotEncodingTransform`: labels connected components with
  `.numpy()` and acvl_utils/scikit-image, which only run on the CPU. -> `DeviceRemoveConnectedComponentTransform`
  (the library's own code on a CPU copy of the one-hot channels, written back to the device; only when it fires).
- `GaussianNoiseTransform`, `ContrastTransform`, `GammaTransform`: draw with `device=img.device`, i.e. from the CUDA
  generator on a GPU (see the rule below). -> `DeviceGaussianNoiseTransform`, `DeviceContrastTransform`,
  `DeviceGammaTransform` (the library's `get_parameters` on a CPU stand-in of the image; the noise field drawn on the
  CPU and moved).

Random stream: batchgeneratorsv2 draws from the global numpy and torch generators. The augmentation runs with its
own numpy/torch states swapped into those globals (`AugmentationStream`), so its draws neither depend on nor
disturb the data loader's (which in-process shares the globals and prefetches, so an interleaved stream would not
survive a mid-epoch stop) and the stream is one small state to checkpoint per rank.

The generator rule: every random draw of the augmentation comes from its own CPU generators (numpy, torch CPU), on
any device; a draw needed on the device is made on the CPU and moved. So the CUDA path draws exactly the numbers of
the CPU path, in the same order, and leaves the stream in the same state (the CPU parity tests then speak for CUDA
too). The cost is the noise field (10% of samples) made by the CPU and copied to the device. The CUDA generator is
never drawn from; `AugmentationStream.active` checks that and names the transform class to rewrite if one did.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from batchgeneratorsv2.helpers.scalar_type import sample_scalar
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.nnunet.random_binary_operator import ApplyRandomBinaryOperatorTransform
from batchgeneratorsv2.transforms.nnunet.remove_connected_components import (
    RemoveRandomConnectedComponentFromOneHotEncodingTransform,
)
from batchgeneratorsv2.transforms.nnunet.seg_to_onehot import MoveSegAsOneHotToDataTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import (
    SpatialTransform,
    _convert_my_grid_to_grid_sample_grid,
    _create_centered_identity_grid2,
    create_affine_matrix_2d,
    create_affine_matrix_3d,
)
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTransform
from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform
from torch.nn.functional import grid_sample

# -- device versions ------------------------------------------------------------------------------------------------


def _from_library(cls: type, transform: BasicTransform) -> Any:
    """`cls` (a subclass of the transform's class) carrying the very same settings."""
    new = cls.__new__(cls)
    new.__dict__.update(vars(transform))
    return new


@contextlib.contextmanager
def _ieee_fp32_conv() -> Iterator[None]:
    """cuDNN convolutions in full float32 here only (TF32 would be ~1e-3 relative off the CPU path's blur), without
    touching the network's setting. torch 2.14's per-operator `cudnn.conv.fp32_precision`: the legacy
    `cudnn.flags(allow_tf32=False)` would also reset `enabled` and `benchmark`, and mixing the two APIs is refused.
    A torch without the per-operator API (pyproject admits 2.5) gets the legacy `cudnn.allow_tf32` switch."""
    cudnn = torch.backends.cudnn
    conv = getattr(cudnn, "conv", None)
    if conv is None or not hasattr(conv, "fp32_precision"):
        legacy = cudnn.allow_tf32
        cudnn.allow_tf32 = False
        try:
            yield
        finally:
            cudnn.allow_tf32 = legacy
        return
    before = conv.fp32_precision
    conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision = before


@contextlib.contextmanager
def _ieee_fp32_matmul() -> Iterator[None]:
    """Grid coordinates in full float32 on CUDA too (a TF32 matmul would move sample points by ~1e-3 voxel)."""
    if not torch.cuda.is_available():
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


class DeviceSpatialTransform(SpatialTransform):
    """SpatialTransform with its grid built on the sample's device and a device segmentation path.

    Same draws as `SpatialTransform.get_parameters` (numpy, same order); same grid arithmetic; the segmentation is
    resampled by the same per-label argmax with the same float16 scores and tie-breaks, with `torch.unique` in place
    of `pd.unique(... .numpy())` and every buffer on the device. Elastic deformation (never used by nnU-Net) is not
    supported.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._check()

    @classmethod
    def from_library(cls, transform: SpatialTransform) -> DeviceSpatialTransform:
        new = _from_library(cls, transform)
        new._grid_cache = {}
        new._check()
        return new

    def _check(self) -> None:
        if self.p_elastic_deform > 0:
            raise NotImplementedError("DeviceSpatialTransform: elastic deformation (p_elastic_deform > 0) is not "
                                      "part of nnU-Net's pipeline and has no device version.")

    def _base_grid(self, device: torch.device) -> torch.Tensor:
        key = (tuple(self.patch_size), str(device))
        grid = self._grid_cache.get(key)
        if grid is None:
            grid = _create_centered_identity_grid2(self.patch_size).float().contiguous().to(device)
            self._grid_cache[key] = grid
        return grid.clone()

    def get_parameters(self, **data_dict) -> dict:
        image = data_dict["image"]
        dim = image.ndim - 1
        do_rotation = np.random.uniform() < self.p_rotation
        do_scale = np.random.uniform() < self.p_scaling
        np.random.uniform()  # the elastic-deformation draw (p_elastic_deform is 0 here)
        if do_rotation:
            angles = [sample_scalar(self.rotation, image=image, dim=i) for i in range(dim)]
            if self.p_rot_per_axis < 1:
                for i in range(dim):
                    if np.random.uniform() > self.p_rot_per_axis:
                        angles[i] = 0
        else:
            angles = [0] * dim
        if do_scale:
            if np.random.uniform() <= self.p_synchronize_scaling_across_axes:
                scales = [sample_scalar(self.scaling, image=image, dim=None)] * dim
            else:
                scales = [sample_scalar(self.scaling, image=image, dim=i) for i in range(dim)]
        else:
            scales = [1] * dim
        affine = None
        if do_scale or do_rotation:
            affine = create_affine_matrix_3d(angles, scales) if dim == 3 else create_affine_matrix_2d(angles[-1], scales)
        shape = image.shape[1:]
        if not self.random_crop:
            center = [i / 2 for i in shape]
        else:
            center = []
            for d in range(dim):
                mn, mx = self.patch_center_dist_from_border[d], shape[d] - self.patch_center_dist_from_border[d]
                center.append(shape[d] / 2 if mx < mn else np.random.uniform(mn, mx))
        grid = None
        if affine is not None:
            device = image.device
            with _ieee_fp32_matmul():
                grid = torch.matmul(self._base_grid(device), torch.from_numpy(affine.T).float().to(device))
            grid += torch.tensor([c - s / 2 for c, s in zip(center, shape)], dtype=torch.float32, device=device)
            grid = _convert_my_grid_to_grid_sample_grid(grid, shape)
        return {"center_location_in_pixels": center, "grid": grid, "affine": affine, "elastic_offsets": None}

    def _apply_to_segmentation(self, segmentation: torch.Tensor, **params) -> torch.Tensor:
        if params["grid"] is None or self.mode_seg == "nearest":
            return super()._apply_to_segmentation(segmentation, **params)  # crop / nearest: device-agnostic
        segmentation = segmentation.contiguous()
        grid, device = params["grid"], segmentation.device
        mode = self._get_grid_sample_padding_mode(self.border_mode_seg)
        pads = mode == "zeros"
        pad_label = self.padding_value_seg if self.border_mode_seg == "constant" else 0
        scale_factor = 1000
        half = 0.5 * scale_factor
        patch = tuple(self.patch_size)
        result_seg = torch.zeros((segmentation.shape[0], *patch), dtype=segmentation.dtype, device=device)
        nn_seg = None

        def _sample(x: torch.Tensor, how: str) -> torch.Tensor:
            return grid_sample(x, grid[None], mode=how, padding_mode=mode, align_corners=self.align_corners)

        def _nearest() -> torch.Tensor:
            nonlocal nn_seg
            if nn_seg is None:
                shift = float(pad_label) if pads else 0.
                nn_seg = (_sample(segmentation[None].float() - shift, "nearest")[0] + shift).to(segmentation.dtype)
            return nn_seg

        may_reach_outside = pads and self._may_reach_outside(grid, segmentation.shape[1:])
        ind = torch.empty(segmentation.shape[1:], dtype=torch.float32, device=device)
        for c in range(segmentation.shape[0]):
            labels = torch.unique(segmentation[c])  # sorted, as np.sort(pd.unique(...))
            if may_reach_outside:
                labels = torch.unique(torch.cat((labels, torch.tensor([pad_label], device=device).to(labels.dtype))))
            if len(labels) == 1:
                result_seg[c] = labels[0]
                continue

            def _score(u: torch.Tensor, c: int = c) -> torch.Tensor:
                torch.eq(segmentation[c], u, out=ind)
                if may_reach_outside and u == pad_label:  # 1 outside the image: sample (ind - 1), add the 1 back
                    return _sample(ind.sub_(1).mul_(scale_factor)[None, None], self.mode_seg)[0][0] \
                        .add_(scale_factor).to(torch.float16)
                return _sample(ind.mul_(scale_factor)[None, None], self.mode_seg)[0][0].to(torch.float16)

            if len(labels) == 2:
                hi = _score(labels[1])
                better = (hi >= half) if self.seg_tiebreak == "highest" else (hi > half)
                use_nn = (hi == half) if self.seg_tiebreak == "nearest" else None
                result_seg[c] = labels[0]
                result_seg[c][better] = labels[1]
            else:
                # SpatialTransform's running argmax (its bg_style_seg_sampling branch is documented bit-identical)
                best_val = None
                nn_c = _nearest()[c] if self.seg_tiebreak == "nearest" else None
                if nn_c is not None:
                    nn_score = torch.full(nn_c.shape, float("-inf"), dtype=torch.float16, device=device)
                    is_nn = torch.empty(nn_c.shape, dtype=torch.bool, device=device)
                better = torch.empty(patch, dtype=torch.bool, device=device)
                for u in labels:
                    cur = _score(u)
                    if nn_c is not None:
                        torch.eq(nn_c, u, out=is_nn)
                        torch.where(is_nn, cur, nn_score, out=nn_score)
                    if best_val is None:
                        best_val = cur
                        result_seg[c] = u
                        continue
                    (torch.ge if self.seg_tiebreak == "highest" else torch.gt)(cur, best_val, out=better)
                    torch.maximum(best_val, cur, out=best_val)
                    result_seg[c][better] = u
                use_nn = (nn_score == best_val) if nn_c is not None else None
            if use_nn is not None:
                torch.where(use_nn, _nearest()[c], result_seg[c], out=result_seg[c])
        return result_seg.contiguous()


class DeviceGaussianBlurTransform(GaussianBlurTransform):
    """GaussianBlurTransform with its kernels made on the image's device, always by direct convolution in fp32.

    nnU-Net sets `benchmark=True`, which times FFT against direct convolution per (size, kernel) with the CPU clock
    and keeps the faster: both compute the same blur, up to float rounding; on a GPU that timing would measure
    kernel launches, not work, so the direct (cuDNN) convolution is used, with TF32 off (`_ieee_fp32_conv`).
    """

    @classmethod
    def from_library(cls, transform: GaussianBlurTransform) -> DeviceGaussianBlurTransform:
        new = _from_library(cls, transform)
        new.benchmark = False
        return new

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        with torch.device(img.device), _ieee_fp32_conv():  # _build_kernel's torch.linspace; the conv in fp32
            return super()._apply_to_image(img, **params)


def _cpu_stand_in(img: torch.Tensor) -> torch.Tensor:
    """A CPU tensor with the image's shape and dtype and one element of storage: all that nnU-Net's samplers read."""
    return torch.zeros((), dtype=img.dtype).expand(img.shape)


def _drawn_on_cpu(get_parameters: Any, data_dict: dict) -> dict:
    """The generator rule for a library transform that draws with `device=img.device`: its own `get_parameters` runs
    on a CPU stand-in of the image (same draws, from the CPU generators), and the tensors it returns move to the
    image's device, where the library would have made them. The image's values are not read (nnU-Net's samplers are
    ranges and `BGContrast`, which ignore them)."""
    img = data_dict["image"]
    params = get_parameters(**dict(data_dict, image=_cpu_stand_in(img)))
    return {k: v.to(img.device) if torch.is_tensor(v) else v for k, v in params.items()}


class DeviceContrastTransform(ContrastTransform):
    """ContrastTransform with its channel draws from the CPU generator (`_drawn_on_cpu`)."""

    @classmethod
    def from_library(cls, transform: ContrastTransform) -> DeviceContrastTransform:
        return _from_library(cls, transform)

    def get_parameters(self, **data_dict) -> dict:
        return _drawn_on_cpu(super().get_parameters, data_dict)


class DeviceGammaTransform(GammaTransform):
    """GammaTransform with its channel / retain-stats / invert draws from the CPU generator (`_drawn_on_cpu`)."""

    @classmethod
    def from_library(cls, transform: GammaTransform) -> DeviceGammaTransform:
        return _from_library(cls, transform)

    def get_parameters(self, **data_dict) -> dict:
        return _drawn_on_cpu(super().get_parameters, data_dict)


class DeviceGaussianNoiseTransform(GaussianNoiseTransform):
    """GaussianNoiseTransform with its channel draws and its noise field from the CPU generator, added on the device.

    `_apply_to_image` is the library's with the noise made on the CPU (same calls, same order) and moved; the sum is
    the same float additions on either device.
    """

    @classmethod
    def from_library(cls, transform: GaussianNoiseTransform) -> DeviceGaussianNoiseTransform:
        return _from_library(cls, transform)

    def get_parameters(self, **data_dict) -> dict:
        return _drawn_on_cpu(super().get_parameters, data_dict)

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        n, sigmas = params["num_apply"], params["sigmas"]
        if n == 0 or sigmas is None:
            return img
        spatial, dtype = img.shape[1:], img.dtype
        if not self.synchronize_channels:
            sigma = torch.as_tensor(sigmas, dtype=dtype).view((n,) + (1,) * len(spatial))
            noise = torch.empty((n, *spatial), dtype=dtype).normal_()
            noise.mul_(sigma)
        else:
            noise = torch.empty((n, *spatial), dtype=dtype).normal_(mean=0.0, std=float(sigmas))
        img.index_add_(0, params["apply_idx"], noise.to(img.device))
        return img


class DeviceRegionsTransform(ConvertSegmentationToRegionsTransform):
    """ConvertSegmentationToRegionsTransform with its region label tensors moved to the segmentation's device."""

    @classmethod
    def from_library(cls, transform: ConvertSegmentationToRegionsTransform) -> DeviceRegionsTransform:
        return _from_library(cls, transform)

    def _apply_to_segmentation(self, segmentation: torch.Tensor, **params) -> torch.Tensor:
        if self.regions and self.regions[0].device != segmentation.device:
            self.regions = [r.to(segmentation.device) for r in self.regions]
        return super()._apply_to_segmentation(segmentation, **params)


class DeviceMoveSegAsOneHotTransform(MoveSegAsOneHotToDataTransform):
    """The cascade's MoveSegAsOneHotToDataTransform with its output (image + one-hot channels) made on the image's device."""

    @classmethod
    def from_library(cls, transform: MoveSegAsOneHotToDataTransform) -> DeviceMoveSegAsOneHotTransform:
        return _from_library(cls, transform)

    def apply(self, data_dict: dict, **params) -> dict:
        with torch.device(data_dict["image"].device):  # its torch.empty
            return super().apply(data_dict, **params)


class _StrelOnDevice:
    """A batchgeneratorsv2 binary operator called with its (CPU) structuring element moved to the input's device."""

    def __init__(self, operator: Any) -> None:
        self.operator = operator

    def __call__(self, x: torch.Tensor, strel: torch.Tensor) -> torch.Tensor:
        return self.operator(x, strel.to(x.device))


class DeviceBinaryOperatorTransform(ApplyRandomBinaryOperatorTransform):
    """The cascade's ApplyRandomBinaryOperatorTransform with its structuring element moved to the image's device.

    Same draws (`get_parameters` is the library's); the operators (fft_conv dilation/erosion) are the library's.
    """

    @classmethod
    def from_library(cls, transform: ApplyRandomBinaryOperatorTransform) -> DeviceBinaryOperatorTransform:
        new = _from_library(cls, transform)
        new.channel_idx = list(transform.channel_idx)  # get_parameters shuffles it in place: its own order
        return new

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        if img.device.type != "cpu":
            params = dict(params, operators=[_StrelOnDevice(o) for o in params["operators"]])
        return super()._apply_to_image(img, **params)


class DeviceRemoveConnectedComponentTransform(RemoveRandomConnectedComponentFromOneHotEncodingTransform):
    """The cascade's RemoveRandomConnectedComponent... run by the library's own code on a CPU copy of the one-hot
    channels, written back to the device.

    Connected-component labelling (acvl_utils / scikit-image, via `.numpy()`) has no torch version; it fires on 20% of
    samples and only reads and writes the channels in `channel_idx`, so only those travel. Same draws, exact.
    """

    @classmethod
    def from_library(cls, transform: RemoveRandomConnectedComponentFromOneHotEncodingTransform
                     ) -> DeviceRemoveConnectedComponentTransform:
        new = _from_library(cls, transform)
        new.channel_idx = list(transform.channel_idx)  # get_parameters shuffles it in place: its own order
        return new

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        if img.device.type == "cpu" or not params["apply_to_channels"]:
            return super()._apply_to_image(img, **params)
        channels = sorted({c % img.shape[0] for c in self.channel_idx})
        on_cpu = torch.empty(img.shape, dtype=img.dtype)  # the other channels are never read
        on_cpu[channels] = img[channels].cpu()
        on_cpu = super()._apply_to_image(on_cpu, **params)
        img[channels] = on_cpu[channels].to(img.device)
        return img


#: batchgeneratorsv2 transforms that run unchanged on tensors of any device (checked in their source: every tensor they
#: make is either on the input's device or a CPU scalar / index used as such, and every draw is from the CPU generator).
REUSED = (
    Convert3DTo2DTransform, Convert2DTo3DTransform, MultiplicativeBrightnessTransform, SimulateLowResolutionTransform,
    MirrorTransform, MaskImageTransform, RemoveLabelTransform, DownsampleSegForDSTransform,
)
#: the library transform -> its device version (reason in each class's docstring and the README).
REWRITTEN: dict[type, type] = {
    SpatialTransform: DeviceSpatialTransform,
    GaussianBlurTransform: DeviceGaussianBlurTransform,
    ConvertSegmentationToRegionsTransform: DeviceRegionsTransform,
    MoveSegAsOneHotToDataTransform: DeviceMoveSegAsOneHotTransform,
    ApplyRandomBinaryOperatorTransform: DeviceBinaryOperatorTransform,
    RemoveRandomConnectedComponentFromOneHotEncodingTransform: DeviceRemoveConnectedComponentTransform,
    GaussianNoiseTransform: DeviceGaussianNoiseTransform,
    ContrastTransform: DeviceContrastTransform,
    GammaTransform: DeviceGammaTransform,
}


def to_device_pipeline(transform: BasicTransform) -> BasicTransform:
    """The same pipeline (same objects' settings, same order and probabilities) with the device versions swapped in."""
    if isinstance(transform, ComposeTransforms):
        return ComposeTransforms([to_device_pipeline(t) for t in transform.transforms])
    if isinstance(transform, RandomTransform):
        return RandomTransform(to_device_pipeline(transform.transform), transform.apply_probability)
    kind = type(transform)
    if kind in REWRITTEN:
        return REWRITTEN[kind].from_library(transform)
    if kind in REUSED or kind in REWRITTEN.values():
        return transform
    raise NotImplementedError(f"{kind.__name__} in the training transforms has not been checked for the device path; "
                              f"train with --data.augment_on_device false.")


# -- the random stream ----------------------------------------------------------------------------------------------


class AugmentationStream:
    """The augmentation's own numpy / torch (CPU) generator states, put into the global generators while it runs.

    Seeded like `np.random.seed(seed); torch.manual_seed(seed)`, so a CPU run draws exactly what batchgeneratorsv2
    run after those two calls draws, and by the generator rule (module docstring) a CUDA run draws the same. States are
    kept as tensors and plain values (checkpoints load with weights_only=True). Checkpoints written before the rule
    may hold a "cuda" state: it is ignored, nothing draws from it any more.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        kind, keys, pos, has_gauss, cached = np.random.RandomState(self.seed).get_state()
        self.numpy = (kind, keys, int(pos), int(has_gauss), float(cached))
        self.torch = torch.Generator().manual_seed(self.seed).get_state()

    @contextlib.contextmanager
    def active(self, device: torch.device) -> Iterator[None]:
        outer_np, outer_torch = np.random.get_state(), torch.get_rng_state()
        cuda_before = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch)
        try:
            yield
        finally:
            self.numpy, self.torch = np.random.get_state(), torch.get_rng_state()
            np.random.set_state(outer_np)
            torch.set_rng_state(outer_torch)
        if cuda_before is not None and not torch.equal(cuda_before, torch.cuda.get_rng_state(device)):
            raise RuntimeError("DeviceAugmentation: a transform drew from the CUDA generator, against the rule that "
                               "every augmentation draw comes from its own CPU generators (device_augment.py); give "
                               "that transform a device version as GaussianNoise has, or train with "
                               "--data.augment_on_device false.")

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, cached = self.numpy
        state = {"seed": self.seed, "torch": self.torch.clone(),
                 "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "pos": int(pos),
                           "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = state["numpy"]
        self.seed = int(state["seed"])
        self.numpy = (n["kind"], n["keys"].numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
                      float(n["cached_gaussian"]))
        self.torch = state["torch"].clone()


# -- the batch transform --------------------------------------------------------------------------------------------


class DeviceAugmentation:
    """nnU-Net's training transforms applied to a batch already on the training device.

    Args:
        transforms: nnU-Net's `get_training_transforms(...)` pipeline (batchgeneratorsv2 objects).
        seed: seed of the augmentation's own random stream (see `AugmentationStream`).
    """

    def __init__(self, transforms: BasicTransform, seed: int = 12345) -> None:
        self.library_transforms = transforms
        self.transforms = to_device_pipeline(transforms)
        self.stream = AugmentationStream(seed)

    @classmethod
    def from_view(cls, view: Any, seed: int = 12345) -> DeviceAugmentation:
        """From a `recipe.trainer_view`: its plans' patch, rotation, mirroring, dummy-2D, DS scales, labels/regions."""
        from resenc_lightning import recipe

        return cls(recipe.training_transforms(view, recipe.augmentation_params(view)), seed=seed)

    @classmethod
    def from_spec(cls, spec: Any, enable_deep_supervision: bool = True, seed: int = 12345) -> DeviceAugmentation:
        from resenc_lightning import recipe

        return cls.from_view(recipe.trainer_view(spec, enable_deep_supervision=enable_deep_supervision), seed=seed)

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        data, target = batch["data"], batch["target"]
        images, segs = [], []
        with self.stream.active(data.device):
            for b in range(data.shape[0]):  # per sample, in order, as nnUNetDataLoader.generate_train_batch
                out = self.transforms(image=data[b], segmentation=target[b])
                images.append(out["image"])
                segs.append(out["segmentation"])
        out_batch = dict(batch)
        out_batch["data"] = torch.stack(images)
        out_batch["target"] = ([torch.stack([s[i] for s in segs]) for i in range(len(segs[0]))]
                               if isinstance(segs[0], list) else torch.stack(segs))
        return out_batch

    def _shuffled(self) -> list[BasicTransform]:
        """The transforms whose `get_parameters` shuffles `channel_idx` in place: that order is part of the stream."""
        found, todo = [], [self.transforms]
        while todo:
            t = todo.pop(0)
            if isinstance(t, ComposeTransforms):
                todo = list(t.transforms) + todo
            elif isinstance(t, RandomTransform):
                todo.insert(0, t.transform)
            elif isinstance(t, (DeviceBinaryOperatorTransform, DeviceRemoveConnectedComponentTransform)):
                found.append(t)
        return found

    def state_dict(self) -> dict[str, Any]:
        state = self.stream.state_dict()
        shuffled = self._shuffled()
        if shuffled:  # the cascade's: without it a resumed run would shuffle from the initial order
            state["channel_orders"] = [torch.tensor(t.channel_idx) for t in shuffled]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
        orders = state.get("channel_orders")
        shuffled = self._shuffled()
        if orders is not None and len(orders) == len(shuffled):
            for t, order in zip(shuffled, orders):
                t.channel_idx = [int(i) for i in order]


def device_seed(base: int, rank: int) -> int:
    """The augmentation stream's seed for one rank: distinct per rank, reproducible from the run seed."""
    return int(np.random.SeedSequence([int(base), int(rank), 0xDA]).generate_state(1)[0])


__all__ = ["AugmentationStream", "DeviceAugmentation", "DeviceBinaryOperatorTransform", "DeviceContrastTransform",
           "DeviceGammaTransform", "DeviceGaussianBlurTransform", "DeviceGaussianNoiseTransform",
           "DeviceMoveSegAsOneHotTransform", "DeviceRegionsTransform", "DeviceRemoveConnectedComponentTransform",
           "DeviceSpatialTransform", "REUSED", "REWRITTEN", "device_seed", "to_device_pipeline"]
