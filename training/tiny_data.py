"""First-use setup for `training/configs/tiny.yaml`: tiny components + a bootstrapped dataset.

Nothing has to be prepared: the tiny VLM / SDXL / detectors (mumu_core.tiny), a small generated
captioned-image folder (training/bootstrap/synthetic.py) and its bootstrap annotations (the tiny
OWLv2 or Grounding DINO, the real bootstrap code) are written under `tiny.root` unless present.
Every step skips what is already complete, so concurrent or repeated runs reuse one copy.
"""

from __future__ import annotations

from pathlib import Path

from .config import TrainConfig


def ensure_tiny_assets(cfg: TrainConfig, progress: bool = False) -> dict[str, Path]:
    from mumu_core.atomic import fsync_dir
    from mumu_core.tiny import write_tiny_components

    from .bootstrap import synthetic
    from .bootstrap.filters import FilterConfig
    from .bootstrap.run import BootstrapOptions, run_bootstrap

    root = Path(cfg.tiny.root)
    paths = write_tiny_components(root / "components")
    images = root / "data" / "folder"
    if not images.is_dir():
        tmp = root / ".data.partial"
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        synthetic.write_dataset(tmp, "folder", synthetic.make_examples(cfg.tiny.num_images, bad=False))
        tmp.rename(root / "data")
        fsync_dir(root)
    boot = root / "boot"
    if not (boot / "manifest.json").is_file():
        # the generated images are ~300 px: the paper's 150x150 minimum would leave few crops
        run_bootstrap(BootstrapOptions(input=str(images), format="folder", detector=str(paths[cfg.tiny.detector]),
                                       out=str(boot), shard_size=4, filters=FilterConfig(min_box_area=48 * 48),
                                       progress=progress))
    return {**paths, "data": images, "annotations": boot}
