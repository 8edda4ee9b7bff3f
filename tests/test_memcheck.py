"""--memcheck without a GPU: a one-line error, nothing trained.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_args

from resenc_lightning.cli import UsageError, main


# -- --memcheck ----------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_memcheck_without_cuda_is_a_one_line_error(tiny_dataset, results_dir):
    with pytest.raises(UsageError) as e:
        main(tiny_args(results_dir, "--memcheck", "true"))
    message = str(e.value)
    assert message.startswith("error: --memcheck") and "needs a CUDA GPU" in message and "\n" not in message
    assert not list(results_dir.rglob("*.ckpt"))  # nothing trained


