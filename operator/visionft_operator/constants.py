"""Names the operator owns: labels, field managers, component names. One place, so that tests and the chart
can refer to them."""

from __future__ import annotations

from visionft_api.resource import GROUP, KUEUE_QUEUE_LABEL, LABEL_PREFIX, PLURAL, VERSION

__all__ = ["GROUP", "KUEUE_QUEUE_LABEL", "PLURAL", "VERSION"]

# The field manager of every write the operator makes (children and status). The trainer uses its own
# (visionft_api.resource.TRAINER_FIELD_MANAGER), so the two never take each other's fields.
FIELD_MANAGER = "visionft-operator"
# The component name on Events and in app.kubernetes.io/managed-by.
COMPONENT = "visionft-operator"

# Labels on every child object. ``visionft.io/name`` selects all children (and pods) of one resource; its
# value is the resource's name, shortened to a label value's 63 characters (names.label_value).
LABEL_NAME = f"{LABEL_PREFIX}name"
# On every training pod: the resource's whole name (a label value may not hold it).
ANNOTATION_NAME = f"{LABEL_PREFIX}name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PART_OF = "app.kubernetes.io/part-of"
PART_OF = "visionft"

# The trainer container's name and the paths inside the pod.
CONTAINER_NAME = "trainer"
CONFIG_MOUNT = "/etc/visionft"
CONFIG_FILE = "config.json"
CA_MOUNT = "/etc/visionft-ca"
SCRATCH_MOUNT = "/scratch"
# A fixed non-root UID/GID for the trainer (the image's user); Pod Security "restricted" needs non-root.
TRAINER_UID = 65532

# On a multi-node run's Job: how many times the group was restarted before this Job was made (gang.py).
ANNOTATION_RESTARTS = f"{LABEL_PREFIX}restarts"
# On a Job that replaces an earlier one of the same run (a group restart, a Job deleted by hand): how many
# trainer pods the earlier Jobs started (status.attempts when this Job was made; status.py) ...
ANNOTATION_ATTEMPTS = f"{LABEL_PREFIX}attempts"
# ... and how many seconds of spec.runPolicy.activeDeadlineSeconds had passed by then (deadline.py).
ANNOTATION_ELAPSED = f"{LABEL_PREFIX}elapsed-seconds"

# Exit codes of ``visionft-train`` that no retry can fix: the Job fails at once (podFailurePolicy FailJob).
# The CLI exits 2 on a config or data error (visionft.job.cli: EXIT_CONFIG) and 3 when
# evaluation.failIfWorseThanBase fails a finished run (EXIT_WORSE_THAN_BASE: training again would give the
# same result); 1 (a crash, an infrastructure failure) and signals (OOM) are retried up to backoffLimit.
NON_RETRYABLE_EXIT_CODES = (2, 3)
