"""Command line: ``python -m fedmaestro [mode=federated|centralized|deploy|hpo|theory] [overrides]``.

Hydra composes conf/ (see fedmaestro/config.py for every key); each mode's module exposes
``run(cfg: Config, run_dir: Path)``. This is the one place in fedmaestro/ that may import the
Flower apps (strategies/), for the federated mode.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from . import checkpoint
from .config import resolve

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

MODE_RUNNERS = {
    "federated": "strategies.simulation",
    "centralized": "fedmaestro.centralized",
    "deploy": "fedmaestro.deploy",
    "hpo": "fedmaestro.hpo",
    "theory": "fedmaestro.theory",
}


# What a wrong config, path or checkpoint raises: printed as one line (the message names the key and the
# fix), not as a traceback; HYDRA_FULL_ERROR=1 shows the traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)


def run_mode(cfg: DictConfig, run_dir: Path) -> None:
    config = resolve(cfg)  # validation: a bad value fails here, before any work
    if config.mode in ("federated", "centralized"):
        checkpoint.refuse_overwrite(run_dir, config.resume, f"{config.mode} run")
    run_dir.mkdir(parents=True, exist_ok=True)
    importlib.import_module(MODE_RUNNERS[config.mode]).run(config, run_dir)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run_mode(cfg, Path(HydraConfig.get().runtime.output_dir))
    except USER_ERRORS as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}\n(HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    _hydra_main()


if __name__ == "__main__":
    main()
