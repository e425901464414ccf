"""Condition types and reasons of a VisionFineTune, in one module.

The three kstatus types (Ready, Reconciling, Stalled) let Flux, Argo CD and ``kubectl wait`` read the state
without custom code. The domain types say why: whether the run was admitted to start, whether it finished.
Reasons are CamelCase and grouped by the condition they belong to.
"""

# Ready means that the fine-tune finished and its outputs are published (the resource is "Current").
READY = "Ready"
# Reconciling means that the operator or the trainer is still working towards the desired state.
RECONCILING = "Reconciling"
# Stalled means that progress stopped and needs a person: a failed run, an invalid spec, a broken reference.
STALLED = "Stalled"
# Admitted means that policy, quota and Kueue let the run start.
ADMITTED = "Admitted"
# Complete means that the trainer finished and uploaded its outputs.
COMPLETE = "Complete"
# Failed means that the run ended without outputs.
FAILED = "Failed"
# Degraded means that the run's output scores worse than its base model on the headline metric of
# spec.evaluation (status.evaluation.final against status.evaluation.base).
DEGRADED = "Degraded"

CONDITION_TYPES = (READY, RECONCILING, STALLED, ADMITTED, COMPLETE, FAILED, DEGRADED)

# Reasons for Ready / Complete.
REASON_SUCCEEDED = "Succeeded"
REASON_IN_PROGRESS = "InProgress"
# Reasons for Reconciling.
REASON_CREATING = "CreatingChildren"
REASON_WAITING_FOR_POD = "WaitingForPod"
REASON_TRAINING = "Training"
REASON_UPLOADING = "Uploading"
REASON_SUSPENDING = "Suspending"
# A pod of a multi-node run failed: the whole group starts again from the last checkpoint.
REASON_RESTARTING_GROUP = "RestartingGroup"
# Reasons for Admitted.
REASON_ADMITTED = "Admitted"
REASON_QUEUED_BY_KUEUE = "QueuedByKueue"
REASON_POLICY_LIMIT = "PolicyLimitReached"
REASON_QUOTA_EXCEEDED = "ResourceQuotaExceeded"
REASON_SUSPENDED = "Suspended"
# No node can run the training pod yet (the scheduler's word): the run waits, and says what to change.
REASON_UNSCHEDULABLE = "Unschedulable"
# The run's Job name is held by another owner's Job (an earlier resource's, being deleted): the run waits.
REASON_NAME_TAKEN = "NameTaken"
# Reasons for Stalled / Failed.
REASON_INVALID_SPEC = "InvalidSpec"
# The apiserver refused a child that the operator creates or updates (validation, admission, quota, RBAC).
REASON_CHILD_REJECTED = "ChildRejected"
# The Job can't create its pod (the Job controller's FailedCreate Event: a PriorityClass, Pod Security).
REASON_FAILED_CREATE = "FailedCreate"
# The kubelet can't set up the trainer container for another reason than a missing Secret or key.
REASON_CREATE_CONTAINER_CONFIG = "CreateContainerConfigError"
REASON_POLICY_VIOLATION = "PolicyViolation"
REASON_MISSING_SECRET = "MissingSecret"
REASON_MISSING_SECRET_KEY = "MissingSecretKey"
REASON_BACKOFF_LIMIT = "BackoffLimitExceeded"
REASON_DEADLINE_EXCEEDED = "DeadlineExceeded"
REASON_POD_FAILED = "PodFailed"
REASON_JOB_FAILED = "JobFailed"
# Reasons for Degraded (WorseThanBase also for Stalled / Failed, when spec.evaluation.failIfWorseThanBase).
REASON_WORSE_THAN_BASE = "WorseThanBase"
REASON_NOT_WORSE_THAN_BASE = "NotWorseThanBase"
# The reason of the Event posted when status.evaluation.best reaches a new step.
REASON_NEW_BEST_METRIC = "NewBestMetric"
