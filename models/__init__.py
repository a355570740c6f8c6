"""Database tables: a job holds videos; a video gets a transcript, then a summary made in a batch."""

from tubesum.models.base import Base
from tubesum.models.tables import TERMINAL_STATUSES, Batch, Job, Summary, Transcript, Video, VideoStatus

__all__ = ["Base", "Batch", "Job", "Summary", "Transcript", "Video", "VideoStatus", "TERMINAL_STATUSES"]
