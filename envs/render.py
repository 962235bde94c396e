"""Video of an evaluation episode, rendered off-screen with MuJoCo (EGL by default).

Frames are 848x480 (480p, 16:9; both multiples of 16, the macro block ffmpeg encodes
without resizing) from a tracking camera that follows the robot, and carry a caption
strip: task, policy, step and the return so far. Gymnasium's v5 tasks name a
``trackbodyid`` in their ``default_camera_config`` but render through a FREE camera,
which ignores it, so a Hopper that hops forward leaves the picture within ~150 steps;
``follow_robot`` switches the camera to MuJoCo's TRACKING mode (the environment's
distance and elevation are kept). Shadows and reflections are switched off in the
MuJoCo scene: they cost extra render passes and add nothing to judging a gait. Writing
the mp4 needs the optional extra ``kinema[video]`` (imageio with its ffmpeg plugin;
imageio depends on Pillow, which draws the caption).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np

VIDEO_WIDTH = 848
VIDEO_HEIGHT = 480
CAPTION_HEIGHT = 28  # pixels of the dark strip along the top of each frame
ROBOT_ROOT_BODY = 1  # body 0 is MuJoCo's world; body 1 is the robot's root (torso) in the locomotion tasks


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


def _offscreen_viewer(env: gymnasium.Env) -> tuple[Any, Any]:
    """(MujocoRenderer, its off-screen viewer) of ``env``, creating the viewer without rendering.

    Gymnasium's MujocoRenderer creates its viewer lazily, in ``_get_viewer(render_mode)``
    (what ``render()`` calls; the same since gymnasium 0.27), and applies the task's
    ``default_camera_config`` there.
    """
    renderer = getattr(env.unwrapped, "mujoco_renderer", None)
    if renderer is None:
        raise ValueError(f"{env.spec.id if env.spec else env}: not a MuJoCo environment, cannot configure rendering")
    _load_triton_before_gl()
    return renderer, renderer._get_viewer(env.unwrapped.render_mode)


def set_fast_rendering(env: gymnasium.Env, fast: bool = True) -> None:
    """Switch MuJoCo's shadows and reflections off (``fast``) or back on for ``env``.

    The flags live on the viewer's ``MjvScene`` and ``mjv_updateScene`` leaves them alone,
    so setting them once (even before ``reset()``) is enough.
    """
    import mujoco  # imported here so MUJOCO_GL, set by kinema.envs, is read first

    _, viewer = _offscreen_viewer(env)
    enabled = 0 if fast else 1
    viewer.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = enabled
    viewer.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = enabled


def follow_robot(env: gymnasium.Env, body: int = ROBOT_ROOT_BODY) -> None:
    """Make ``env``'s camera track ``body`` (its subtree's centre of mass: the whole robot for body 1).

    MuJoCo's TRACKING camera moves its look-at point with the body and keeps the distance,
    azimuth and elevation the task configured. Gymnasium's renderer passes
    ``camera_id=-1`` to every render, which resets the camera to FREE; with ``camera_id``
    None it leaves the camera as set here.
    """
    import mujoco

    renderer, viewer = _offscreen_viewer(env)
    if not 0 < body < env.unwrapped.model.nbody:
        raise ValueError(f"cannot track body {body}: the model has bodies 1..{env.unwrapped.model.nbody - 1} besides the world")
    viewer.cam.type = mujoco.mjtCamera.mjCAMERA_TRACKING
    viewer.cam.trackbodyid = body
    renderer.camera_id = None


def release_rendering(env: gymnasium.Env) -> None:
    """Free ``env``'s off-screen GL resources now, in their own GL context.

    ``env.close()`` frees the GL context but leaves MuJoCo's ``MjrContext`` to the garbage
    collector, whose ``mjr_freeContext`` then deletes framebuffer ids in whatever context
    is current: a later video's, whose frames come out black. A later ``render()``
    creates a fresh viewer.
    """
    renderer = getattr(env.unwrapped, "mujoco_renderer", None)
    viewers = getattr(renderer, "_viewers", None)
    if not viewers:
        return
    for viewer in viewers.values():
        viewer.make_context_current()
        viewer.con.free()
        viewer.close()
    viewers.clear()
    renderer.viewer = None


@functools.cache
def _caption_font() -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=17)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:
        return ImageFont.load_default()  # older Pillow: its small bitmap font


def draw_caption(frame: np.ndarray, text: str) -> np.ndarray:
    """``frame`` (H, W, 3) uint8 with ``text`` in white on a dark strip along its top."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(np.ascontiguousarray(frame))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, image.width, CAPTION_HEIGHT - 1), fill=(24, 24, 24))
    draw.text((10, 1), text, fill=(255, 255, 255), font=_caption_font())
    return np.asarray(image)


class EpisodeVideo:
    """Streams captioned frames of one environment into an mp4 (frames are not kept in memory).

    The environment must have been made with ``render_mode="rgb_array"``, normally with
    ``width=VIDEO_WIDTH, height=VIDEO_HEIGHT``. Its camera follows the robot. Each frame's
    caption is ``title`` (e.g. task and policy) followed by what ``capture`` is told.
    """

    def __init__(self, env: gymnasium.Env, path: str | Path, fps: float | None = None, fast: bool = True,
                 title: str = ""):
        if env.render_mode != "rgb_array":
            raise ValueError(f"video needs an environment made with render_mode='rgb_array', got {env.render_mode!r}")
        imageio = require_video_writer()
        self.env = env
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fps = float(fps if fps is not None else env.metadata.get("render_fps", 30))
        set_fast_rendering(env, fast)
        follow_robot(env)
        self.title = title
        self.frames = 0
        self._writer = imageio.get_writer(str(self.path), fps=self.fps, codec="libx264", quality=7)

    def capture(self, step: int | None = None, episode_return: float | None = None) -> None:
        """Append the current frame; ``step`` and ``episode_return`` (so far) join the caption."""
        parts = [self.title] if self.title else []
        if step is not None:
            parts.append(f"step {step}")
        if episode_return is not None:
            parts.append(f"return {episode_return:.1f}")
        self._writer.append_data(draw_caption(self.env.render(), "   |   ".join(parts)))
        self.frames += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            release_rendering(self.env)

    def __enter__(self) -> EpisodeVideo:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
