"""Video of an evaluation episode, rendered off-screen with MuJoCo (EGL by default).

Shadows and reflections are switched off in the MuJoCo scene: they cost extra render
passes and add nothing to judging a gait. Writing the mp4 needs the optional extra
``kinema[video]`` (imageio with its ffmpeg plugin).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import gymnasium

VIDEO_WIDTH = 320
VIDEO_HEIGHT = 240


class VideoExtraMissingError(ImportError):
    """imageio / imageio-ffmpeg are not installed."""


def require_video_writer() -> Any:
    """The imageio module, or a clear error saying how to install it."""
    try:
        import imageio
        import imageio_ffmpeg  # noqa: F401  (the ffmpeg binary imageio writes mp4 with)
    except ImportError as error:
        raise VideoExtraMissingError(
            f"writing evaluation videos needs imageio and imageio-ffmpeg ({error}); "
            f"install them with: pip install kinema[video]"
        ) from error
    return imageio


def _load_triton_before_gl() -> None:
    """Import triton (when installed) before the first off-screen GL context exists.

    With software EGL (Mesa llvmpipe) the GL driver brings its own LLVM into the process;
    triton's libtriton loaded after it segfaults at import (seen with triton 3.9, e.g. when
    FlexAttention compiles after an evaluation video). Loaded first, both work. About a
    second, paid only by processes that render.
    """
    if importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401


def set_fast_rendering(env: gymnasium.Env, fast: bool = True) -> None:
    """Switch MuJoCo's shadows and reflections off (``fast``) or back on for ``env``.

    Gymnasium's MujocoRenderer creates its off-screen viewer lazily, in
    ``_get_viewer(render_mode)`` (what ``render()`` calls; the same since gymnasium 0.27).
    Calling it here creates the viewer without rendering, and before ``reset()``. The
    flags live on the viewer's ``MjvScene`` and ``mjv_updateScene`` leaves them alone, so
    setting them once is enough.
    """
    import mujoco  # imported here so MUJOCO_GL, set by kinema.envs, is read first

    renderer = getattr(env.unwrapped, "mujoco_renderer", None)
    if renderer is None:
        raise ValueError(f"{env.spec.id if env.spec else env}: not a MuJoCo environment, cannot set render flags")
    _load_triton_before_gl()
    viewer = renderer._get_viewer(env.unwrapped.render_mode)
    enabled = 0 if fast else 1
    viewer.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = enabled
    viewer.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = enabled


class EpisodeVideo:
    """Streams frames of one environment into an mp4 (frames are not kept in memory).

    The environment must have been made with ``render_mode="rgb_array"``; give it
    ``width=VIDEO_WIDTH, height=VIDEO_HEIGHT`` to keep encoding cheap.
    """

    def __init__(self, env: gymnasium.Env, path: str | Path, fps: float | None = None, fast: bool = True):
        if env.render_mode != "rgb_array":
            raise ValueError(f"video needs an environment made with render_mode='rgb_array', got {env.render_mode!r}")
        imageio = require_video_writer()
        self.env = env
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fps = float(fps if fps is not None else env.metadata.get("render_fps", 30))
        set_fast_rendering(env, fast)
        self.frames = 0
        self._writer = imageio.get_writer(str(self.path), fps=self.fps, codec="libx264", quality=7)

    def capture(self) -> None:
        self._writer.append_data(self.env.render())
        self.frames += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> EpisodeVideo:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
