"""What the user typed → videos: parse URLs and ids, read source files, resolve playlists, load CSVs.

Decisions (the issue left these open):
- A watch URL that carries both ``v=`` and ``list=`` is the *video* (what YouTube plays when you
  open it); only ``/playlist?list=…`` or a watch URL with ``list=`` and no ``v=`` is a playlist.
- Playlist entries YouTube shows as "[Private video]" / "[Deleted video]" are kept as videos: they
  fail at fetch time with YouTube's own reason, so the job's report says what happened to each.
- A CSV's encoding is settled before any row is recorded: a byte-order mark (UTF-8, UTF-16, UTF-32)
  or UTF-16's NUL pattern decides, otherwise the file must be valid UTF-8. One that is not is
  refused with the encoding it looks like (``--encoding`` names it): replacing the bytes would lose
  every accent of a Latin-1 file without a word.
- A CSV row with fewer fields than its header, or a header naming a column twice, is refused: an
  empty field (``abc,``) is a video without a transcript (recorded as failed), a missing one is a
  broken file. Unnamed header columns (a spreadsheet's trailing commas) may repeat.
- NUL characters in a CSV are dropped (PostgreSQL text cannot store them); other control
  characters are kept here and removed when the prompt is built.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tubesum.errors import BadInput
from tubesum.text import is_blank

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

YDL_OPTIONS: dict[str, Any] = {"extract_flat": "in_playlist", "skip_download": True, "quiet": True, "no_warnings": True}


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

# Bytes read at a time while hashing the file and checking its encoding.
SCAN_BLOCK_BYTES = 1 << 20
# Bytes around an undecodable byte that charset-normalizer reads to name the file's real encoding.
GUESS_WINDOW_BYTES = 64 * 1024
# A file without a byte-order mark whose first block is at least this share of NUL bytes, nearly
# all at even (or all at odd) offsets, is UTF-16 (big- or little-endian); UTF-8 text has almost none.
UTF16_NUL_SHARE = 0.3
# Byte-order marks, longest first (the UTF-32 LE mark starts with the UTF-16 LE one).
BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


@dataclass(frozen=True)
class CsvFile:
    """A transcripts CSV checked before any row is recorded: readable, and decodable as a whole."""

    path: Path
    encoding: str  # the Python codec its rows are decoded with
    size: int  # bytes
    sha256: str  # of its bytes: the same file submitted twice is recognised

    @property
    def name(self) -> str:
        return str(self.path)


def inspect_transcripts_csv(path: str | Path, *, encoding: str | None = None) -> CsvFile:
    """Hash the file and settle its encoding in one streaming pass: a byte-order mark (UTF-8,
    UTF-16, UTF-32) or UTF-16's NUL pattern decides; otherwise it must be valid UTF-8, and a file
    that is not is refused with the encoding it looks like (no character is ever replaced).
    ``encoding`` (``--encoding``) overrides the detection."""
    path = Path(path)
    if encoding is not None:
        try:
            encoding = codecs.lookup(encoding).name
        except LookupError:
            raise BadInput(f"unknown encoding {encoding!r} (e.g. utf-8, latin-1, cp1252, utf-16)") from None
    digest, size = hashlib.sha256(), 0
    decoder = None
    try:
        with path.open("rb") as raw:
            while block := raw.read(SCAN_BLOCK_BYTES):
                if decoder is None:
                    encoding = encoding or sniff_encoding(block)
                    decoder = codecs.getincrementaldecoder(encoding)("strict")
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as exc:
                    # utf-8-sig counts from after its mark in the first block.
                    shift = len(codecs.BOM_UTF8) if encoding == "utf-8-sig" and size == 0 else 0
                    raise undecodable(path, encoding=encoding, offset=size + shift + max(0, exc.start)) from None
                digest.update(block)
                size += len(block)
            if decoder is not None:
                try:
                    decoder.decode(b"", final=True)
                except UnicodeDecodeError:
                    raise undecodable(path, encoding=encoding, offset=max(0, size - 1)) from None
    except OSError as exc:
        raise BadInput(f"cannot read transcripts CSV {str(path)!r}: {exc.strerror or exc}") from exc
    return CsvFile(path, encoding or "utf-8", size, digest.hexdigest())


def sniff_encoding(head: bytes) -> str:
    """The codec a byte-order mark or UTF-16's NUL pattern names; else ``utf-8`` (checked later)."""
    for bom, name in BOMS:
        if head.startswith(bom):
            return name
    nuls = head.count(0)
    if head and nuls >= UTF16_NUL_SHARE * len(head):
        even = head[0::2].count(0)
        return "utf-16-be" if even > (nuls - even) else "utf-16-le"
    return "utf-8"


def undecodable(path: Path, *, encoding: str, offset: int) -> BadInput:
    """The refusal of a file that ``encoding`` cannot decode: where, which byte, and the encoding
    it looks like."""
    with path.open("rb") as raw:
        before = raw.read(offset)
        window = raw.read(GUESS_WINDOW_BYTES)
    line = before.count(b"\n") + 1
    start = max(0, len(before) - GUESS_WINDOW_BYTES // 2)
    guesses = guess_encodings(before[start:] + window)
    looks = (
        f"it looks like {' or '.join(guesses)}: save it as UTF-8, or pass --encoding {guesses[0]}"
        if guesses
        else "save it as UTF-8, or pass --encoding with its encoding (e.g. latin-1, cp1252)"
    )
    what = "UTF-8" if encoding in ("utf-8", "utf-8-sig") else f"valid {encoding}"
    return BadInput(f"transcripts CSV {str(path)!r} is not {what} (byte 0x{window[:1].hex()} on line {line}); {looks}")


# Encodings named in the refusal, at most (a short sample fits several single-byte code pages).
GUESSES_SHOWN = 2
# Between guesses that read the sample equally well, the more common encoding is named first
# (French text reads as well in cp1250 as in cp1252, but is far likelier to be cp1252).
COMMON_ENCODINGS = ("cp1252", "iso8859-1", "iso8859-15", "cp1251", "cp1250", "shift_jis", "gb18030", "euc_kr", "big5")


def guess_encodings(sample: bytes) -> list[str]:
    """charset-normalizer's best guesses for a sample that is not UTF-8, as codec names."""
    from charset_normalizer import from_bytes  # only needed for this message

    matches = [m for m in from_bytes(sample) if m.encoding not in ("utf_8", "ascii")]
    if not matches:
        return []
    best_chaos = min(m.chaos for m in matches)

    def rank(name: str) -> int:
        return COMMON_ENCODINGS.index(name) if name in COMMON_ENCODINGS else len(COMMON_ENCODINGS)

    tied = sorted({codecs.lookup(m.encoding).name for m in matches if m.chaos == best_chaos}, key=rank)
    rest = [codecs.lookup(m.encoding).name for m in matches if m.chaos != best_chaos]
    return list(dict.fromkeys(tied + rest))[:GUESSES_SHOWN]


def iter_transcripts_csv(
    csv_file: CsvFile, *, on_bytes: Callable[[int], None] | None = None
) -> Iterator[CsvTranscript]:
    """Rows of ``video_id,transcript[,title]``, streamed (memory stays flat whatever the file's
    size). A blank transcript (only whitespace, control or zero-width characters) is kept as ""
    and its video recorded as failed. ``on_bytes`` is told the file position as rows are read."""
    csv.field_size_limit(2**31 - 1)  # transcripts of long videos exceed the 128 KiB default
    name = csv_file.name
    with csv_file.path.open("rb") as raw, io.TextIOWrapper(raw, encoding=csv_file.encoding, newline="") as text:
        # strict: a quote never closed (or text after a closing quote) is an error, not a field that
        # silently swallows every row after it.
        reader = csv.DictReader(text, strict=True)
        columns = [c.strip() for c in _fieldnames(reader, name)]
        missing = [c for c in CSV_REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise BadInput(
                f"transcripts CSV {name!r} lacks column(s) {', '.join(missing)} (has: {', '.join(columns) or 'none'})"
            )
        repeated = _repeated_columns(columns)
        if repeated:
            # DictReader keeps the last of two same-named columns: the other's text would be lost unsaid.
            raise BadInput(
                f"transcripts CSV {name!r} line 1 (the header) names column(s) {', '.join(repeated)} more than "
                f"once: keep one of each"
            )
        count = 0
        for row in _rows(reader, name):
            if None in row:  # more fields than the header: an unquoted comma, most likely
                raise BadInput(
                    f"transcripts CSV {name!r} line {reader.line_num} has {len(columns) + len(row[None])} "
                    f"fields, the header {len(columns)}: quote a field that contains a comma"
                )
            lacking = [k for k, v in row.items() if v is None]  # DictReader's restval: fields the row lacks
            if lacking:  # an empty field ("abc,") is a value; a field not there at all is a broken row
                raise BadInput(
                    f"transcripts CSV {name!r} line {reader.line_num} has {len(columns) - len(lacking)} "
                    f"field(s), the header {len(columns)}: it lacks {', '.join(k.strip() for k in lacking)} "
                    f"(an empty field still needs its comma)"
                )
            # NUL: PostgreSQL text cannot hold it (the whole job's insert would fail); never meaningful.
            row = {(k or "").strip(): (v or "").replace("\x00", "") for k, v in row.items()}
            video_id = row["video_id"].strip()
            if not video_id or len(video_id) > CSV_MAX_ID_LEN:
                raise BadInput(
                    f"transcripts CSV {name!r} line {reader.line_num}: video_id must be 1..{CSV_MAX_ID_LEN} characters, got {video_id!r}"
                )
            transcript = row["transcript"].strip()
            yield CsvTranscript(
                video_id, "" if is_blank(transcript) else transcript, row.get("title", "").strip() or None
            )
            count += 1
            if on_bytes is not None and count % PROGRESS_EVERY_ROWS == 0:
                on_bytes(raw.tell())
        if on_bytes is not None:
            on_bytes(csv_file.size)
    if not count:
        raise BadInput(f"transcripts CSV {name!r} has no rows")


def _repeated_columns(columns: Sequence[str]) -> list[str]:
    """Header names given more than once; unnamed columns (a spreadsheet's trailing commas) are
    ignored, as their fields are."""
    counts = Counter(c for c in columns if c)
    return [c for c, n in counts.items() if n > 1]


def _fieldnames(reader: csv.DictReader, name: str) -> list[str]:
    try:
        return list(reader.fieldnames or [])
    except csv.Error as exc:
        raise BadInput(f"transcripts CSV {name!r} line 1 (the header) cannot be read: {exc}") from None


def _rows(reader: csv.DictReader, name: str) -> Iterator[dict]:
    """The reader's rows; a malformed one (csv.Error) is refused naming the line where it starts."""
    while True:
        starts = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            if "unexpected end of data" in str(exc):
                raise BadInput(
                    f"transcripts CSV {name!r} line {starts}: a quoted field opens there and is never closed "
                    f'(the file ends inside it); close the quote, and write a quote inside a field as ""'
                ) from None
            raise BadInput(
                f"transcripts CSV {name!r} line {starts}: {exc}; "
                f'a field with a quote in it must be quoted whole, its quotes doubled ("")'
            ) from None
        yield row


# Rows between two progress reports while reading a CSV.
PROGRESS_EVERY_ROWS = 500


def load_transcripts_csv(path: str | Path, *, encoding: str | None = None) -> list[CsvTranscript]:
    """Every row at once (the bench's prompts; `tubesum submit` streams instead)."""
    return list(iter_transcripts_csv(inspect_transcripts_csv(path, encoding=encoding)))
