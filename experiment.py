"""Train a dataset's configurations x folds as jobs (local GPUs/CPUs or SLURM) and select the best model with nnU-Net.
`python experiment.py --help` lists every option; `python experiment.py status ...` shows each fold."""

from resenc_lightning.experiment import main

if __name__ == "__main__":
    main()
