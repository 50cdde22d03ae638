"""Distils a trained MoE workdir into a dense student of its activated size (Switch section 5).

python experiments/distill.py --teacher_workdir=/runs/moe --workdir=/runs/student \
    [--dense_baseline_workdir=/runs/dense] [--config.train.steps=2000] \
    [--hard_weight=0.25 --soft_weight=0.75 --temperature=1.0 --noinit_from_teacher]

By default the student trains with the teacher's data, recipe and steps; `--config.<field>=...`
overrides any field of the student's config. Writes <workdir>/distill_result.json (see
glam_jax/distill.py train_student).
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from glam_jax import cli, distill, gpu_defaults
from glam_jax.presets.base import get_base_config

_TEACHER = flags.DEFINE_string("teacher_workdir", None, "Trained MoE workdir (the teacher).")
_WORKDIR = flags.DEFINE_string("workdir", None, "The student's workdir.")
# The base config only gives the --config.<field> overrides their types; the student's config
# itself starts from the teacher's.
_CONFIG = config_flags.DEFINE_config_dict(
    "config", get_base_config(), "Student overrides, e.g. --config.train.steps=500."
)
_TEACHER_CONFIG = config_flags.DEFINE_config_file(
    "teacher_config", None, "Teacher's config file, for workdirs without config.json."
)
_DENSE = flags.DEFINE_string(
    "dense_baseline_workdir", "", "Dense model trained from scratch on the same tokens (optional)."
)
_HARD = flags.DEFINE_float("hard_weight", 0.25, "Weight of CE against the labels, in [0, 1].")
_SOFT = flags.DEFINE_float("soft_weight", 0.75, "Weight of CE against the teacher, in [0, 1].")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature of both models.")
_T2 = flags.DEFINE_bool("scale_soft_by_t2", False, "Multiply the soft term by temperature^2.")
_INIT = flags.DEFINE_bool(
    "init_from_teacher", True, "Start from the teacher's non-expert weights (Switch's trick)."
)
flags.mark_flags_as_required(["teacher_workdir", "workdir"])


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    result = distill.train_student(
        _TEACHER.value,
        _WORKDIR.value,
        config_overrides=config_flags.get_override_values(flags.FLAGS["config"]),
        teacher_config=_TEACHER_CONFIG.value,
        dense_baseline_workdir=_DENSE.value,
        hard_weight=_HARD.value,
        soft_weight=_SOFT.value,
        temperature=_TEMPERATURE.value,
        scale_soft_by_t2=_T2.value,
        init_from_teacher=_INIT.value,
    )
    keys = ("student_eval_loss", "teacher_eval_loss", "dense_eval_loss", "retained_fraction")
    print(json.dumps({key: result[key] for key in keys}))


if __name__ == "__main__":
    gpu_defaults.apply()  # XLA/CUDA settings for GPU hosts; nothing elsewhere
    cli.run(main)  # a GlamError (bad workdir, setting or config) becomes one `error:` line
