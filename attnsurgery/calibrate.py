"""Moved: choice scoring to :mod:`attnsurgery.eval.scoring`, the ACT head sweep to
:mod:`attnsurgery.patches.act.calibrate`, the temperature fit to :mod:`attnsurgery.patches.temperature.calibrate`
(it runs on the shared trainer, :func:`attnsurgery.train.train`). Old imports from here keep working."""

from ._moved import forward_to

__getattr__ = forward_to(
    (
        "attnsurgery.eval.scoring",
        "attnsurgery.patches.act.calibrate",
        "attnsurgery.patches.act.selection",
        "attnsurgery.patches.act.sweep",
        "attnsurgery.patches.temperature.calibrate",
    ),
    {
        "_device": "input_device",
        "_HeadGather": "HeadGather",
        "_continuation_ll": "continuation_ll",
        "_run_plain": "choice_lls",
        "_mean_nll": "mean_nll",
        "_texts": "texts_of",
        "_check_selection": "check_selection",
        "_NOTHING_KEPT": "NOTHING_KEPT",
    },
)
