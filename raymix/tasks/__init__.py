"""Task sources: every loader yields :class:`~raymix.tasks.records.TaskRecord`."""

from raymix.tasks.records import SPLITS, TaskRecord, assign_splits, group_by_task

__all__ = ["SPLITS", "TaskRecord", "assign_splits", "group_by_task"]
