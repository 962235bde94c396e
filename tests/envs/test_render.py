"""Evaluation video frames: a camera that keeps the robot in the picture, and a caption."""

from __future__ import annotations

import gc

import mujoco
import numpy as np
import pytest

from kinema.envs import VIDEO_HEIGHT, VIDEO_WIDTH, EpisodeVideo, follow_robot, make_env, set_fast_rendering
from kinema.envs.render import CAPTION_HEIGHT, draw_caption, release_rendering


def robot_pixels(frame: np.ndarray) -> np.ndarray:
    """Mask of the Hopper's pixels: its geoms are orange-brown (rgba 0.8 0.6 0.4), while the
    floor is grey and the sky blue-grey, so red well above blue means robot."""
    red, blue = frame[..., 0].astype(int), frame[..., 2].astype(int)
    return red - blue > 60


def hopper_carried_forward(steps: int, metres_per_step: float) -> tuple[np.ndarray, float]:
    """The last frame (with kinema's video camera) of a Hopper episode whose body is carried
    forward each step, and how far it got. Carried, not walked: a gait that travels needs a
    trained policy; this test is about the camera, and 2.5 cm per step is a good Hopper's pace."""
    env = make_env("hopper", render_mode="rgb_array", width=VIDEO_WIDTH, height=VIDEO_HEIGHT,
                   terminate_when_unhealthy=False)
    try:
        set_fast_rendering(env)
        follow_robot(env)
        env.reset(seed=0)
        model, data = env.unwrapped.model, env.unwrapped.data
        for _ in range(steps):
            env.step(np.zeros(3))
            data.qpos[0] += metres_per_step
            mujoco.mj_forward(model, data)
        return env.render(), float(data.qpos[0])
    finally:
        release_rendering(env)
        env.close()


def test_the_camera_keeps_a_travelling_hopper_in_the_middle_of_the_frame() -> None:
    frame, distance = hopper_carried_forward(steps=300, metres_per_step=0.025)
    assert frame.shape == (VIDEO_HEIGHT, VIDEO_WIDTH, 3) and VIDEO_HEIGHT >= 480
    assert distance > 7.0  # far beyond the frame of a camera that stays where the episode started
    rows, cols = np.nonzero(robot_pixels(frame))
    assert len(rows) > 1000, "the robot is not in the picture"
    assert abs(cols.mean() / VIDEO_WIDTH - 0.5) < 0.15 and abs(rows.mean() / VIDEO_HEIGHT - 0.5) < 0.25


def test_a_caption_strip_is_burnt_into_the_top_of_each_frame() -> None:
    frame = np.full((VIDEO_HEIGHT, VIDEO_WIDTH, 3), 150, dtype=np.uint8)
    captioned = draw_caption(frame, "hopper   |   bc   |   step 12   |   return 34.5")
    strip = captioned[:CAPTION_HEIGHT]
    assert (strip < 60).mean() > 0.8 and (strip > 200).any()  # white text on a dark strip
    assert np.array_equal(captioned[CAPTION_HEIGHT:], frame[CAPTION_HEIGHT:])
    other = draw_caption(frame, "hopper   |   bc   |   step 13   |   return 36.0")
    assert not np.array_equal(other[:CAPTION_HEIGHT], strip)


def test_a_video_made_after_another_is_not_black(tmp_path) -> None:
    """Gymnasium's env.close() leaves MuJoCo's render context to the garbage collector, which
    then frees its framebuffers in whatever GL context is current: the next video's, whose
    frames came out black. EpisodeVideo.close() frees them itself."""
    imageio = pytest.importorskip("imageio")
    pytest.importorskip("imageio_ffmpeg")
    first = make_env("hopper", render_mode="rgb_array", width=VIDEO_WIDTH, height=VIDEO_HEIGHT)
    first.reset(seed=0)
    first_video = EpisodeVideo(first, tmp_path / "first.mp4", title="first")
    first_video.capture()
    first_video.close()
    first.close()
    second = make_env("hopper", render_mode="rgb_array", width=VIDEO_WIDTH, height=VIDEO_HEIGHT)
    second.reset(seed=0)
    with EpisodeVideo(second, tmp_path / "second.mp4", title="second") as second_video:
        del first, first_video  # collected while the second video renders
        gc.collect()
        second_video.capture()
    second.close()
    for name in ("first", "second"):
        reader = imageio.get_reader(str(tmp_path / f"{name}.mp4"))
        try:
            frame = reader.get_data(0)
        finally:
            reader.close()
        assert robot_pixels(frame).sum() > 1000, f"the {name} video does not show the robot"
