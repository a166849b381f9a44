"""Command line: ``python -m fedmaestro [mode=federated|centralized|deploy|hpo|theory] [overrides]``.

Hydra composes conf/ (see fedmaestro/config.py for every key); each mode's module exposes
``run(cfg: Config, run_dir: Path)``. This is the one place in fedmaestro/ that may import the
Flower apps (strategies/), for the federated mode.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .config import resolve

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

MODE_RUNNERS = {
    "federated": "strategies.simulation",
    "centralized": "fedmaestro.centralized",
    "deploy": "fedmaestro.deploy",
    "hpo": "fedmaestro.hpo",
    "theory": "fedmaestro.theory",
}


def run_mode(cfg: DictConfig, run_dir: Path) -> None:
    config = resolve(cfg)  # validation: a bad value fails here, before any work
    run_dir.mkdir(parents=True, exist_ok=True)
    importlib.import_module(MODE_RUNNERS[config.mode]).run(config, run_dir)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    run_mode(cfg, Path(HydraConfig.get().runtime.output_dir))


def main() -> None:
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    _hydra_main()


if __name__ == "__main__":
    main()
