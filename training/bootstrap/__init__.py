"""Dataset bootstrapping (MUMU arXiv 2406.18790 §3): ground caption phrases in their images with an
open-vocabulary detector (Grounding DINO by default, OWLv2 as an alternative), filter the boxes as
the paper does and write resumable, deterministic annotation shards that reference the source
images. Run as `mumu bootstrap ...` or `accelerate launch -m mumu_training.bootstrap ...`.
See docs/bootstrap.md; the record format is documented in `records.py`.
"""
