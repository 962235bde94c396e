"""A family from outside the repository plugs in through entry points alone: it trains, evaluates
and takes inference options from the command line while no kinema file knows its name."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

HERE = Path(__file__).resolve().parent
ENTRY_POINTS = """[kinema.policies]
plugin_linear = kinema_plugin_family

[kinema.samplers]
plugin_transitions = kinema_plugin_family
"""


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """A directory holding the plug-in module and the dist-info that announces its entry points."""
    root = tmp_path_factory.mktemp("site")
    shutil.copy(HERE / "kinema_plugin_family.py", root)
    dist_info = root / "kinema_plugin_family-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: kinema-plugin-family\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(ENTRY_POINTS)
    return root


@pytest.fixture()
def with_plugin(plugin_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(plugin_path), os.environ.get("PYTHONPATH")])))
    return plugin_path


def test_the_family_shows_every_config_field(cli, with_plugin: Path, tmp_path: Path) -> None:
    proc = cli.run([cli.script("kinema-train"), "policy=plugin_linear", "--cfg", "job"], cwd=tmp_path)
    policy = yaml.safe_load(proc.stdout)["policy"]
    assert policy["name"] == "plugin_linear" and policy["inference"] == {"noise_scale": 0.1}
    assert policy["recipe"]["schedule"] == "cosine" and policy["recipe"]["ema"] is True


@pytest.mark.slow
def test_the_family_trains_evaluates_and_takes_inference_options(cli, with_plugin: Path, hopper_random_hdf5: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cli.run([cli.script("kinema-train"), "policy=plugin_linear", f"dataset.path={hopper_random_hdf5}", "train.steps=20",
             "train.log_every=5", "eval.episodes=3", "eval.num_envs=3", f"hydra.run.dir={run}"], cwd=tmp_path)
    result = json.loads((run / "eval.json").read_text())
    assert result["policy"] == "plugin_linear" and result["episodes"] == 3 and "target_return" not in result
    checkpoint = run / "checkpoint"
    assert (checkpoint / "ema.safetensors").is_file()
    stats = json.loads((checkpoint / "stats.json").read_text())["features"]
    assert stats.keys() == {"observations", "actions"} and stats["actions"].keys() == {"mean", "std"}
    assert stats["observations"].keys() == {"mean", "std", "min"}  # normalisation's own, and what the family adds

    # Inference options change without retraining; noise follows the episode seeds, so the number of
    # environments run at once does not change the returns (beyond float rounding of batched matmuls).
    returns = []
    for index in range(2):
        out = tmp_path / f"eval{index}"
        cli.run([cli.script("kinema-eval"), f"checkpoint={run}", "+inference.noise_scale=0.5", "eval.episodes=2",
                 f"eval.num_envs={index + 1}", f"hydra.run.dir={out}"], cwd=tmp_path)
        evaluation = json.loads((out / "eval.json").read_text())
        assert evaluation["inference"] == {"noise_scale": 0.5}
        returns.append(evaluation["returns"])
    np.testing.assert_allclose(returns[0], returns[1], rtol=1e-5)

    refused = cli.run([cli.script("kinema-eval"), f"checkpoint={run}", "+inference.bogus=1", f"hydra.run.dir={tmp_path / 'e3'}"],
                      cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "bogus" in refused.stderr and "noise_scale" in refused.stderr
    refused = cli.run([cli.script("kinema-eval"), f"checkpoint={run}", "eval.target_return=100", f"hydra.run.dir={tmp_path / 'e4'}"],
                      cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "takes no target return" in refused.stderr


def test_a_checkpoint_without_the_action_statistics_is_refused_by_name(cli, with_plugin: Path, tmp_path: Path) -> None:
    # In a subprocess, so this pytest process never imports (and registers) the plug-in.
    code = (
        "import numpy as np, kinema_plugin_family as plugin\n"
        "from kinema.policies import NormStats, PolicySpec\n"
        "spec = PolicySpec(3, 2, (-1.0, -1.0), (1.0, 1.0))\n"
        "stats = NormStats({'observations': {'mean': np.zeros(3), 'std': np.ones(3), 'min': -np.ones(3)}})\n"
        "plugin.PluginLinearPolicy(plugin.LinearConfig(), spec, stats)\n"
    )
    proc = cli.run([sys.executable, "-c", code], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "actions.mean, which is missing" in proc.stderr
