"""--init_from_nnunet: nnU-Net's pretrained-weights rule, loaded on the CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_PLANS, tiny_args
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

from resenc_lightning.cli import UsageError, build_cli, main
from resenc_lightning.nnunet_import import NnUNetImportError, init_from_nnunet


def _native_checkpoint(cli, path):
    """A checkpoint of the same architecture with other weights (set through the parameters, so the
    state_dict's aliases, e.g. all_modules.* and decoder.encoder.*, stay consistent)."""
    net = cli.model.network
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save({"network_weights": weights, "trainer_name": "nnUNetTrainer"}, path)
    return weights


def test_init_from_nnunet_matches_nnunets_own_loader(tiny_dataset, results_dir, tmp_path):
    source = build_cli(tiny_args(results_dir))
    path = tmp_path / "checkpoint_final.pth"
    weights = _native_checkpoint(source, path)
    ours = build_cli(tiny_args(tmp_path / "r1")).model.network
    ref = build_cli(tiny_args(tmp_path / "r2")).model.network
    ref.load_state_dict(ours.state_dict())
    copied = init_from_nnunet(ours, path)
    load_pretrained_weights(ref, str(path))
    for key, value in ours.state_dict().items():
        assert torch.equal(value, ref.state_dict()[key]), key
        if ".seg_layers." in key:
            assert not torch.equal(value, weights[key])  # heads keep their fresh init, as in nnU-Net
    assert copied and all(torch.equal(ours.state_dict()[k], weights[k]) for k in copied)


def test_init_from_nnunet_rejects_another_architecture_in_one_line(tiny_dataset, results_dir, tmp_path):
    path = tmp_path / "checkpoint_2d.pth"
    _native_checkpoint(build_cli(tiny_args(results_dir, "--configuration", "2d")), path)
    net = build_cli(tiny_args(tmp_path / "r")).model.network
    with pytest.raises(NnUNetImportError, match="use the plans/configuration it was trained with"):
        init_from_nnunet(net, path)
    with pytest.raises(UsageError) as e:
        main(tiny_args(tmp_path / "r3", "--init_from_nnunet", str(path)))
    assert "\n" not in str(e.value) and TINY_PLANS not in str(e.value)
    with pytest.raises(UsageError, match="does not exist"):
        main(tiny_args(tmp_path / "r4", "--init_from_nnunet", str(tmp_path / "missing.pth")))
