"""rayhooks: TensorFlow's MonitoredTrainingSession hooks, on Ray workers.

    import rayhooks as rh

The hook classes keep `tf.compat.v1.train`'s names, signatures, defaults and
error messages; see the README for the TF1 -> rayhooks mapping.
"""

from rayhooks.basic_hooks import (LoggingTensorHook, NanLossDuringTrainingError, NanTensorHook,
                                  StepCounterHook, StopAtStepHook)
from rayhooks.checkpoint_hooks import (AsyncCheckpointSaverHook, CheckpointSaverHook, CheckpointSaverListener,
                                       Preempted)
from rayhooks.checkpoints import CheckpointInfo, CheckpointStore, RetentionPolicy
from rayhooks.claim import DirectoryTakenOver
from rayhooks.coordinator import Coordinator
from rayhooks.follow import CommittedCheckpoint, checkpoints_iterator
from rayhooks.handle import SessionHandle
from rayhooks.monitored_session import MonitoredSession, MonitoredTrainingSession
from rayhooks.savers import NumpySaver, TrackableSaver
from rayhooks.scaffold import Scaffold
from rayhooks.session_run_hook import (GLOBAL_STEP, SessionRunArgs, SessionRunContext, SessionRunHook,
                                       SessionRunValues)
from rayhooks.snapshot import Snapshot
from rayhooks.storage import RetryPolicy, Storage
from rayhooks.summary_hook import SummarySaverHook
from rayhooks.summary_writer import SummaryWriter, SummaryWriterCache
from rayhooks.timer import ManualClock, NeverTriggerTimer, SecondOrStepTimer

__version__ = "0.1.0"

__all__ = [
    "AsyncCheckpointSaverHook", "CheckpointInfo", "CheckpointSaverHook", "CheckpointSaverListener",
    "CheckpointStore", "CommittedCheckpoint", "Coordinator", "DirectoryTakenOver", "GLOBAL_STEP", "LoggingTensorHook", "ManualClock",
    "MonitoredSession", "MonitoredTrainingSession", "NanLossDuringTrainingError", "NanTensorHook",
    "NeverTriggerTimer", "NumpySaver", "Preempted", "RetentionPolicy", "RetryPolicy", "Scaffold",
    "SecondOrStepTimer", "SessionHandle", "SessionRunArgs", "SessionRunContext", "SessionRunHook",
    "SessionRunValues", "Snapshot", "StepCounterHook", "StopAtStepHook", "Storage", "SummarySaverHook",
    "SummaryWriter", "SummaryWriterCache", "TrackableSaver", "checkpoints_iterator",
]

from rayhooks.launch import LaunchResult, launch  # noqa: E402  (after the hooks it builds on)
from rayhooks.worker import WorkerContext, WorkerError  # noqa: E402

__all__ += ["LaunchResult", "WorkerContext", "WorkerError", "launch"]
