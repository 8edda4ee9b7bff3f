"""The two rules that make the CUDA augmentation the CPU one, proven without a GPU.

- The blur convolves in full float32: cuDNN's TF32 (on by default for convolutions) is off inside the blur's conv call
  and only there (the network keeps its setting).
- Every random draw comes from the augmentation's CPU generators, whatever the image's device: on an image on another
  device (here "meta", which has no generator of its own: a draw there would move no CPU state) the transforms that
  draw leave the CPU generators exactly where the CPU path leaves them, with the CPU path's values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise import gaussian_blur
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform

from resenc_lightning.device_augment import to_device_pipeline

META = torch.device("meta")


def seed_all(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


def cpu_streams() -> tuple[np.ndarray, int, torch.Tensor]:
    _, keys, pos, _, _ = np.random.get_state()
    return keys.copy(), int(pos), torch.get_rng_state().clone()


def assert_same_streams(a, b) -> None:
    assert np.array_equal(a[0], b[0]) and a[1] == b[1], "numpy stream"
    assert torch.equal(a[2], b[2]), "torch CPU stream"


# -- the blur in fp32 ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, conv", [((2, 10, 9, 8), "conv3d"), ((2, 12, 11), "conv2d")])
def test_the_blur_convolves_without_tf32_and_leaves_the_setting_alone(monkeypatch, shape, conv):
    seen: list[str] = []
    original = getattr(gaussian_blur, conv)

    def spy(*args, **kwargs):
        seen.append(torch.backends.cudnn.conv.fp32_precision)
        return original(*args, **kwargs)

    monkeypatch.setattr(gaussian_blur, conv, spy)
    before = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark)
    blur = to_device_pipeline(GaussianBlurTransform((0.5, 1.0), False, False, 1, benchmark=True))
    seed_all(0)
    blur(image=torch.randn(shape))
    assert seen and set(seen) == {"ieee"}, seen  # TF32 ("tf32", cuDNN's default) would be ~1e-3 off on a GPU
    after = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark)
    assert after == before


def test_the_blur_uses_the_legacy_switch_on_a_torch_without_per_operator_precision(monkeypatch):
    """pyproject admits torch >= 2.5; before the per-operator API only `cudnn.allow_tf32` exists."""
    from types import SimpleNamespace

    from resenc_lightning import device_augment

    legacy = SimpleNamespace(allow_tf32=True)
    monkeypatch.setattr(torch.backends, "cudnn", legacy)
    with device_augment._ieee_fp32_conv():
        assert legacy.allow_tf32 is False
    assert legacy.allow_tf32 is True


# -- every draw from the CPU generators ------------------------------------------------------------------------------
DRAWING = {
    "noise, per channel": lambda: GaussianNoiseTransform((0, 0.1), 1, False),
    "noise, synchronised, some channels": lambda: GaussianNoiseTransform((0, 0.1), 0.5, True),
    "contrast": lambda: ContrastTransform(BGContrast((0.75, 1.25)), True, False, 1),
    "gamma, inverted": lambda: GammaTransform(BGContrast((0.7, 1.5)), 1, False, 1, 1),
    "gamma, some channels": lambda: GammaTransform(BGContrast((0.7, 1.5)), 0, False, 0.5, 0.3),
}


@pytest.mark.parametrize("name", list(DRAWING))
def test_parameters_are_drawn_on_the_cpu_whatever_the_images_device(name):
    """The library's draws on a CPU image and the device version's on a meta image: same CPU streams afterwards,
    same parameter values, the tensors placed on the image's device."""
    library = DRAWING[name]()
    img = torch.randn((3, 6, 5, 4), generator=torch.Generator().manual_seed(1))
    for seed in range(20):
        seed_all(seed)
        ref = library.get_parameters(image=img.clone())
        ref_streams = cpu_streams()
        seed_all(seed)
        out = to_device_pipeline(DRAWING[name]()).get_parameters(image=img.to(META))
        assert_same_streams(ref_streams, cpu_streams())
        assert ref.keys() == out.keys()
        for key, value in ref.items():
            if torch.is_tensor(value):
                assert out[key].device == META and out[key].shape == value.shape and out[key].dtype == value.dtype
            else:
                assert out[key] == value, key


@pytest.mark.parametrize("make", [lambda: GaussianNoiseTransform((0, 0.1), 1, False),
                                  lambda: GaussianNoiseTransform((0.05, 0.1), 1, True)])
def test_the_noise_field_is_the_cpu_paths_on_any_device(monkeypatch, make):
    """The noise added to a meta image is drawn on the CPU (then moved): bit for bit the library's noise on the CPU,
    and the CPU streams end where the CPU path's end."""
    img = torch.zeros((2, 6, 5, 4))
    seed_all(4)
    ref = make()(image=img.clone())["image"]  # zeros + noise: the noise itself
    ref_streams = cpu_streams()
    moved: list[torch.Tensor] = []
    to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        if self.device.type == "cpu" and self.ndim == 4 and META in (*args, kwargs.get("device")):
            moved.append(self)
        return to(self, *args, **kwargs)

    device_version, on_meta = to_device_pipeline(make()), img.to(META)
    seed_all(4)
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "to", spy)
        device_version(image=on_meta)
    assert_same_streams(ref_streams, cpu_streams())
    assert len(moved) == 1 and torch.equal(moved[0], ref)
