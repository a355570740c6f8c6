"""Pure units: parsing what users type, reading source files and transcript CSVs."""

from __future__ import annotations

import pytest

from tubesum.producer.sources import (
    CsvTranscript,
    PlaylistRef,
    VideoRef,
    load_transcripts_csv,
    parse_source,
    read_sources_file,
)
from tubesum.producer.submit import Planned, plan_videos
from tubesum.errors import BadInput

VID = "dQw4w9WgXcQ"
PL = "PLFs4vir_WsTwEd-nJgVJCZPNL3HALHHpF"


@pytest.mark.parametrize(
    "text",
    [
        VID,
        f"  {VID}\n",
        f"https://www.youtube.com/watch?v={VID}",
        f"http://youtube.com/watch?v={VID}&t=42s&feature=share#comments",
        f"www.youtube.com/watch?feature=shared&v={VID}",
        f"https://youtu.be/{VID}",
        f"https://youtu.be/{VID}?si=abc123&t=10",
        f"https://www.youtube.com/shorts/{VID}",
        f"https://www.youtube.com/embed/{VID}?start=5",
        f"https://www.youtube-nocookie.com/embed/{VID}",
        f"https://www.youtube.com/live/{VID}?feature=share",
        f"https://m.youtube.com/watch?v={VID}",
        f"https://music.youtube.com/watch?v={VID}&list=RDAMVM{VID}",
        f"https://www.youtube.com/watch?v={VID}&list={PL}&index=3",  # a video within a playlist: the video
    ],
)
def test_video_urls_and_ids(text: str) -> None:
    assert parse_source(text) == VideoRef(VID)


@pytest.mark.parametrize(
    "text",
    [
        f"https://www.youtube.com/playlist?list={PL}",
        f"https://m.youtube.com/playlist?list={PL}&si=x#top",
        f"https://music.youtube.com/playlist?list={PL}",
        f"https://www.youtube.com/watch?list={PL}",  # no v=: the playlist
        f"youtube.com/playlist?list={PL}",
    ],
)
def test_playlist_urls(text: str) -> None:
    ref = parse_source(text)
    assert ref == PlaylistRef(PL)
    assert ref.url == f"https://www.youtube.com/playlist?list={PL}"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty source"),
        ("hello", "'hello' is not a YouTube URL or an 11-character video id"),
        ("dQw4w9WgXc", "not a YouTube URL or an 11-character video id"),  # 10 characters
        ("dQw4w9WgXcQQ", "not a YouTube URL or an 11-character video id"),  # 12 characters
        ("https://vimeo.com/12345", "not a YouTube URL (host 'vimeo.com')"),
        ("ftp://youtube.com/watch?v=dQw4w9WgXcQ", "not an http(s) URL"),
        ("https://www.youtube.com/watch?v=dQw4w9WgX!Q", "'dQw4w9WgX!Q' is not a valid video id"),
        ("https://youtu.be/", "'' is not a valid video id"),
        ("https://www.youtube.com/watch?t=4", "watch URL without a video id"),
        ("https://www.youtube.com/playlist?list=", "is not a valid playlist id"),
        ("https://www.youtube.com/@somechannel", "neither a video nor a playlist"),
    ],
)
def test_bad_sources_name_the_input(text: str, fragment: str) -> None:
    with pytest.raises(BadInput) as info:
        parse_source(text)
    assert fragment in str(info.value)
    if text:
        assert repr(text) in str(info.value) or text in str(info.value)


def test_sources_file_skips_blanks_and_comments(tmp_path) -> None:
    path = tmp_path / "sources.txt"
    path.write_text(f"# nature videos\n\n{VID}\n  https://youtu.be/{VID}  # again\n   \n#{PL}\n")
    assert read_sources_file(path) == [VID, f"https://youtu.be/{VID}"]


def test_missing_sources_file_is_bad_input(tmp_path) -> None:
    with pytest.raises(BadInput, match="cannot read sources file"):
        read_sources_file(tmp_path / "nope.txt")


def test_csv_loads_rows_titles_and_empty_transcripts(tmp_path) -> None:
    path = tmp_path / "t.csv"
    path.write_text('video_id,transcript,title\nvid-1,"Hello, bees.\nThey dance.",Bees\nvid-2,,Empty\nvid-3,  Owls  ,\n')
    assert load_transcripts_csv(path) == [
        CsvTranscript("vid-1", "Hello, bees.\nThey dance.", "Bees"),
        CsvTranscript("vid-2", "", "Empty"),
        CsvTranscript("vid-3", "Owls", None),
    ]


def test_csv_missing_columns_are_named(tmp_path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("id,text\n1,hello\n")
    with pytest.raises(BadInput, match=r"lacks column\(s\) video_id, transcript \(has: id, text\)"):
        load_transcripts_csv(path)


def test_csv_rejects_empty_or_overlong_ids(tmp_path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("video_id,transcript\n,hello\n")
    with pytest.raises(BadInput, match="line 2: video_id must be 1..32 characters"):
        load_transcripts_csv(path)
    path.write_text("video_id,transcript\n" + "x" * 33 + ",hello\n")
    with pytest.raises(BadInput, match="video_id must be"):
        load_transcripts_csv(path)


def test_csv_with_invalid_utf8_is_decoded_with_replacement(tmp_path) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes(b"\xef\xbb\xbfvideo_id,transcript\nv1,caf\xe9 au lait\n")  # BOM, then Latin-1 bytes
    assert load_transcripts_csv(path) == [CsvTranscript("v1", "caf\ufffd au lait", None)]


def test_csv_without_rows_is_bad_input(tmp_path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("video_id,transcript\n")
    with pytest.raises(BadInput, match="has no rows"):
        load_transcripts_csv(path)


def test_plan_drops_duplicates_keeping_first_position_and_attaches_csv() -> None:
    a, b, c = "aaaaaaaaaaa", "bbbbbbbbbbb", "ccccccccccc"
    videos = [VideoRef(a, "A"), VideoRef(b), VideoRef(a, "A again")]
    rows = [CsvTranscript(b, "text of b", "B"), CsvTranscript("own-id", "text", None), CsvTranscript("own-id", "x")]
    assert plan_videos(videos, rows) == [
        Planned(a, "A", None),
        Planned(b, "B", rows[0]),
        Planned("own-id", None, rows[1]),
    ]
