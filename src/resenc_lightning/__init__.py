"""nnU-Net v2 ResEnc training on PyTorch Lightning, with stable epoch times."""

import os

# nnU-Net sizes its validation-export and metrics process pools with nnUNet_def_n_proc (default 8), read when
# nnunetv2 is first imported. More processes than cores only costs start-up time: default to the core count.
os.environ.setdefault("nnUNet_def_n_proc", str(min(8, os.cpu_count() or 1)))
