"""What every kinema command line shares: Hydra set-up, run directories, one-paragraph errors."""

from __future__ import annotations

import functools
import os
import secrets
import sys
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")
HYDRA_VERSION_BASE = "1.3"

# Errors a user can fix (bad file, bad value, missing key): reported as one paragraph, exit 2.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, NotADirectoryError, IsADirectoryError, PermissionError)


def _unique_suffix() -> str:
    # Two runs started in the same second get different run directories.
    return f"{os.getpid()}-{secrets.token_hex(2)}"


if not OmegaConf.has_resolver("kinema_unique"):
    OmegaConf.register_new_resolver("kinema_unique", _unique_suffix, use_cache=True)


def register_configs() -> None:
    """Config groups of kinema-train and kinema-eval, built from code so each default lives in one place.

    ``policy=<name>``: every registered family (``kinema.policies``), its node the family's
    config dataclass, so ``--cfg job`` shows every field and Hydra checks types.
    ``dataset=<name>``: every dataset of the suite manifest, and the embedded slice.
    ``train_schema``: kinema-train's own fields (``kinema.train.config.TrainConfig``).
    Called by those apps only: kinema-collect's own ``dataset=<name>`` is a plain key.
    """
    from hydra.core.config_store import ConfigStore

    from kinema.datasets.suite import EMBEDDED_NAME, suite_names
    from kinema.policies import available_policies, policy_class
    from kinema.train.config import TrainConfig

    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    for name in available_policies():
        node = OmegaConf.merge({"name": name}, OmegaConf.structured(policy_class(name).config_class))
        store.store(group="policy", name=name, node=node)
    for name in (EMBEDDED_NAME, *suite_names()):
        store.store(group="dataset", name=name, node={"name": name, "path": None})


def compose_train_config(overrides: list[str]) -> dict:
    """kinema-train's resolved config for ``overrides``, without running it (tests, benchmarks)."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=HYDRA_VERSION_BASE):
        return to_plain(compose("train", overrides=overrides))


def report_user_errors(command: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[DictConfig], Any]]:
    """Wrap a Hydra task function so a user error prints one paragraph and exits non-zero."""

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
        @functools.wraps(task)
        def wrapped(cfg: DictConfig) -> Any:
            try:
                return task(cfg)
            except USER_ERRORS as error:
                message = error.args[0] if isinstance(error, KeyError) and error.args else error
                print(f"{command}: error: {message}", file=sys.stderr)
                sys.exit(2)

        return wrapped

    return decorate


def refuse_run_dir_that_is_a_file(command: str, argv: list[str] | None = None) -> None:
    """``hydra.run.dir=<an existing file>`` ends in a traceback inside Hydra; say it plainly first."""
    for argument in sys.argv[1:] if argv is None else argv:
        key, sep, value = argument.partition("=")
        if sep and key.lstrip("+") in ("hydra.run.dir", "hydra.sweep.dir") and Path(value).expanduser().is_file():
            print(f"{command}: error: {key.lstrip('+')}={value} is an existing file; it must name a directory", file=sys.stderr)
            sys.exit(2)


def to_plain(cfg: DictConfig | dict | None) -> dict:
    """A resolved plain dict of a config node (what checkpoints and policies receive)."""
    if cfg is None:
        return {}
    if isinstance(cfg, dict):
        return dict(cfg)
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
