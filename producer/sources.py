"""What the user typed → videos: parse URLs and ids, read source files, resolve playlists, load CSVs.

Decisions (the issue left these open):
- A watch URL that carries both ``v=`` and ``list=`` is the *video* (what YouTube plays when you
  open it); only ``/playlist?list=…`` or a watch URL with ``list=`` and no ``v=`` is a playlist.
- Playlist entries YouTube shows as "[Private video]" / "[Deleted video]" are kept as videos: they
  fail at fetch time with YouTube's own reason, so the job's report says what happened to each.
- A CSV with bytes that are not UTF-8 is decoded with ``errors="replace"`` and a warning is logged:
  one bad character should not stop a thousand-video job.
- NUL characters in a CSV are dropped (PostgreSQL text cannot store them); other control
  characters are kept here and removed when the prompt is built.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tubesum.errors import BadInput

log = logging.getLogger(__name__)

VIDEO_ID_RE = re.compile(r"[A-Za-z0-9_-]{11}")
PLAYLIST_ID_RE = re.compile(r"[A-Za-z0-9_-]{2,64}")
YOUTUBE_HOSTS = frozenset(
    {
        "youtube.com",
        "www.youtube.com",
        "m.youtube.com",
        "music.youtube.com",
        "youtube-nocookie.com",
        "www.youtube-nocookie.com",
    }
)
SHORT_HOSTS = frozenset({"youtu.be", "www.youtu.be"})
# Path prefixes whose next segment is the video id: /shorts/ID, /embed/ID, /live/ID, /v/ID.
ID_PATH_PREFIXES = frozenset({"shorts", "embed", "live", "v", "e"})
# Longest video id accepted from a CSV (the tutorial's CSV may use its own ids; Video.video_id is 32).
CSV_MAX_ID_LEN = 32
CSV_REQUIRED_COLUMNS = ("video_id", "transcript")


@dataclass(frozen=True)
class VideoRef:
    video_id: str
    title: str | None = None


@dataclass(frozen=True)
class PlaylistRef:
    playlist_id: str

    @property
    def url(self) -> str:
        return f"https://www.youtube.com/playlist?list={self.playlist_id}"


Source = VideoRef | PlaylistRef


@dataclass(frozen=True)
class CsvTranscript:
    video_id: str
    transcript: str  # "" when the row had none: the video is recorded as failed
    title: str | None = None


# --- parsing -------------------------------------------------------------------------------------


def parse_source(text: str) -> Source:
    """One playlist URL, video URL or bare 11-character video id → a ref; else BadInput."""
    s = text.strip()
    if not s:
        raise BadInput("empty source")
    if VIDEO_ID_RE.fullmatch(s):
        return VideoRef(s)
    if "://" not in s and "/" not in s and "." not in s:
        raise BadInput(f"{text!r} is not a YouTube URL or an 11-character video id")
    url = urlsplit(s if "://" in s else "https://" + s)
    if url.scheme not in ("http", "https"):
        raise BadInput(f"{text!r} is not an http(s) URL")
    host = (url.hostname or "").lower()
    segments = [p for p in url.path.split("/") if p]
    query = parse_qs(url.query)

    if host in SHORT_HOSTS:
        return _video_ref(segments[0] if segments else "", text)
    if host not in YOUTUBE_HOSTS:
        raise BadInput(f"{text!r} is not a YouTube URL (host {host or 'missing'!r})")

    if segments[:1] == ["playlist"]:
        return _playlist_ref(query, text)
    if segments[:1] == ["watch"]:
        if "v" in query:
            return _video_ref(query["v"][0], text)
        if "list" in query:
            return _playlist_ref(query, text)
        raise BadInput(f"{text!r} is a watch URL without a video id (v=) or playlist (list=)")
    if len(segments) >= 2 and segments[0] in ID_PATH_PREFIXES:
        return _video_ref(segments[1], text)
    raise BadInput(f"{text!r} is a YouTube URL but neither a video nor a playlist")


def _video_ref(candidate: str, original: str) -> VideoRef:
    if not VIDEO_ID_RE.fullmatch(candidate):
        raise BadInput(f"{original!r}: {candidate!r} is not a valid video id (11 of A-Z a-z 0-9 _ -)")
    return VideoRef(candidate)


def _playlist_ref(query: dict[str, list[str]], original: str) -> PlaylistRef:
    playlist_id = (query.get("list") or [""])[0]
    if not PLAYLIST_ID_RE.fullmatch(playlist_id):
        raise BadInput(f"{original!r}: {playlist_id!r} is not a valid playlist id")
    return PlaylistRef(playlist_id)


def read_sources_file(path: str | Path) -> list[str]:
    """One source per line; blank lines and ``#`` comments (whole-line or trailing) are ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise BadInput(f"cannot read sources file {str(path)!r}: {exc.strerror or exc}") from exc
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


# --- playlists -----------------------------------------------------------------------------------

YdlFactory = Callable[[dict[str, Any]], Any]  # options → a yt_dlp.YoutubeDL (tests inject a replaying one)

YDL_OPTIONS: dict[str, Any] = {"extract_flat": "in_playlist", "skip_download": True, "quiet": True,
                               "no_warnings": True}


class _YdlLogger:
    """yt-dlp prints errors to stderr even when quiet; route everything to logging instead."""

    def debug(self, msg: str) -> None:
        log.debug("yt-dlp: %s", msg)

    def info(self, msg: str) -> None:
        log.debug("yt-dlp: %s", msg)

    def warning(self, msg: str) -> None:
        log.info("yt-dlp: %s", msg)

    def error(self, msg: str) -> None:
        log.info("yt-dlp: %s", msg)


def default_ydl(options: dict[str, Any]) -> Any:
    from yt_dlp import YoutubeDL  # heavy import, only needed when a playlist is given

    return YoutubeDL(options)


def resolve_playlist(ref: PlaylistRef, *, make_ydl: YdlFactory = default_ydl) -> list[VideoRef]:
    """The playlist's videos (ids and titles) in playlist order, via yt-dlp flat extraction."""
    from yt_dlp.utils import DownloadError

    try:
        with make_ydl({**YDL_OPTIONS, "logger": _YdlLogger()}) as ydl:
            info = ydl.extract_info(ref.url, download=False)
    except DownloadError as exc:
        reason = re.sub(r"^ERROR:\s*(\[[^\]]+\]\s*)?", "", str(exc)).strip()
        reason = reason.removeprefix(f"{ref.playlist_id}:").strip()
        raise BadInput(f"playlist {ref.playlist_id} cannot be read: {reason}") from exc
    entries = [e for e in (info or {}).get("entries") or [] if e and e.get("id")]
    videos = [VideoRef(e["id"], e.get("title")) for e in entries if VIDEO_ID_RE.fullmatch(e["id"])]
    if not videos:
        raise BadInput(f"playlist {ref.playlist_id} has no videos")
    return videos


def expand_sources(sources: Iterable[str], *, make_ydl: YdlFactory = default_ydl) -> list[VideoRef]:
    """Parse every source first (so a typo fails before any network call), then resolve playlists."""
    refs = [parse_source(s) for s in sources]
    videos: list[VideoRef] = []
    for ref in refs:
        videos.extend(resolve_playlist(ref, make_ydl=make_ydl) if isinstance(ref, PlaylistRef) else [ref])
    return videos


# --- CSV of ready transcripts ----------------------------------------------------------------------


def load_transcripts_csv(path: str | Path) -> list[CsvTranscript]:
    """Rows of ``video_id,transcript[,title]``. Rows with an empty transcript are kept (transcript "")."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise BadInput(f"cannot read transcripts CSV {str(path)!r}: {exc.strerror or exc}") from exc
    text = raw.decode("utf-8-sig", errors="replace")
    if "\ufffd" in text and b"\xef\xbf\xbd" not in raw:
        log.warning("%s is not valid UTF-8; undecodable bytes were replaced with U+FFFD", path)
    csv.field_size_limit(2**31 - 1)  # transcripts of long videos exceed the 128 KiB default
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = [c.strip() for c in reader.fieldnames or []]
    missing = [c for c in CSV_REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise BadInput(f"transcripts CSV {str(path)!r} lacks column(s) {', '.join(missing)} (has: {', '.join(columns) or 'none'})")
    rows: list[CsvTranscript] = []
    for row in reader:
        line_no = reader.line_num
        # NUL: PostgreSQL text cannot hold it (the whole job's insert would fail); never meaningful.
        row = {(k or "").strip(): (v or "").replace("\x00", "") for k, v in row.items()}
        video_id = row["video_id"].strip()
        if not video_id or len(video_id) > CSV_MAX_ID_LEN:
            raise BadInput(f"transcripts CSV {str(path)!r} line {line_no}: video_id must be 1..{CSV_MAX_ID_LEN} characters, got {video_id!r}")
        rows.append(CsvTranscript(video_id, row["transcript"].strip(), row.get("title", "").strip() or None))
    if not rows:
        raise BadInput(f"transcripts CSV {str(path)!r} has no rows")
    return rows
