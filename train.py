"""Train nnU-Net ResEnc plans with PyTorch Lightning. `python train.py --help` lists every option."""

from resenc_lightning.cli import main

if __name__ == "__main__":
    main()
