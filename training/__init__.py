"""MUMU training module (importable as `mumu_training`): dataset bootstrapping, sample building,
the accelerate training loop and export. Scripts here run by path, e.g.
`accelerate launch training/train.py --config training/configs/tiny.yaml`."""
