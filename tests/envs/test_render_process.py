"""Rendering must not break later imports in the same process (GL driver vs triton's LLVM)."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import os, sys
from kinema.envs import make_env
from kinema.envs.render import EpisodeVideo, VIDEO_HEIGHT, VIDEO_WIDTH
env = make_env("hopper", render_mode="rgb_array", width=VIDEO_WIDTH, height=VIDEO_HEIGHT)
env.reset(seed=0)
with EpisodeVideo(env, sys.argv[1]) as video:
    video.capture()
import triton  # what FlexAttention / Triton kernels load later in a training process
print("ok")
"""


def test_triton_imports_after_a_video_was_rendered(tmp_path) -> None:
    pytest.importorskip("imageio_ffmpeg")
    if __import__("importlib").util.find_spec("triton") is None:
        pytest.skip("triton not installed")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "v.mp4")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")
