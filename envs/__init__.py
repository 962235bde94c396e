"""kinema.envs: task registry, normalised score, vectorised evaluation, video.

MuJoCo picks its OpenGL backend when it is first imported, so head-less EGL rendering
is chosen here, before anything imports mujoco; a user's own MUJOCO_GL still wins.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

from .evaluate import EvalResult, TrialsResult, evaluate  # noqa: E402
from .registry import TASKS, TaskSpec, get_task, list_tasks, make_env, make_vector_env, task_spaces  # noqa: E402
from .render import (  # noqa: E402
    VIDEO_HEIGHT,
    VIDEO_WIDTH,
    EpisodeVideo,
    VideoExtraMissingError,
    follow_robot,
    require_video_writer,
    set_fast_rendering,
)
from .scores import normalized_score, reference_returns  # noqa: E402

__all__ = [
    "TASKS",
    "TaskSpec",
    "get_task",
    "list_tasks",
    "make_env",
    "make_vector_env",
    "task_spaces",
    "normalized_score",
    "reference_returns",
    "EvalResult",
    "TrialsResult",
    "evaluate",
    "EpisodeVideo",
    "VideoExtraMissingError",
    "require_video_writer",
    "set_fast_rendering",
    "follow_robot",
    "VIDEO_WIDTH",
    "VIDEO_HEIGHT",
]
