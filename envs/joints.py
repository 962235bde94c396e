"""Joint limits of a task's actuated joints, located in its observation: what a deployment's safety layer keeps.

For each actuator that drives one limited hinge or slide joint directly (MuJoCo's joint transmission,
positive gear), the joint's range and the observation index of its position. The index is found
the way ``kinema.envs.bodygraph`` verifies layouts: a marker value is written into the joint's
``qpos`` and the environment's own ``_get_obs()`` must show it at exactly one index. Joints whose
position the observation does not contain (or contains transformed) are left out.
"""

from __future__ import annotations

from typing import Any

import mujoco
import numpy as np

MARKER = 12345.678


def actuated_joint_limits(env: Any) -> list[dict[str, Any]]:
    """``[{name, obs_index, act_index, low, high}]`` for the actuated, limited joints ``env`` observes."""
    base = env.unwrapped
    model, data = base.model, base.data
    saved = data.qpos.copy()
    limits = []
    try:
        for actuator in range(model.nu):
            joint = int(model.actuator_trnid[actuator, 0])
            if (int(model.actuator_trntype[actuator]) != int(mujoco.mjtTrn.mjTRN_JOINT) or model.actuator_gear[actuator, 0] <= 0
                    or not model.jnt_limited[joint]
                    or int(model.jnt_type[joint]) not in (int(mujoco.mjtJoint.mjJNT_HINGE), int(mujoco.mjtJoint.mjJNT_SLIDE))):
                continue
            address = int(model.jnt_qposadr[joint])
            data.qpos[:] = saved
            data.qpos[address] = MARKER
            found = np.flatnonzero(np.asarray(base._get_obs()) == MARKER)
            if len(found) != 1:
                continue
            name = mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_JOINT, joint) or f"joint{joint}"
            low, high = (float(value) for value in model.jnt_range[joint])
            limits.append({"name": name, "obs_index": int(found[0]), "act_index": actuator, "low": low, "high": high})
    finally:
        data.qpos[:] = saved
    return limits
