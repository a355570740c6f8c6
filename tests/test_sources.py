"""Pure units: parsing what users type, reading source files and transcript CSVs."""

from __future__ import annotations

import pytest

from tubesum.errors import BadInput
from tubesum.producer.sources import (
    CsvTranscript,
    PlaylistRef,
    VideoRef,
    load_transcripts_csv,
    parse_source,
    read_sources_file,
)
from tubesum.text import is_blank

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
    path.write_text(
        'video_id,transcript,title\nvid-1,"Hello, bees.\nThey dance.",Bees\nvid-2,,Empty\nvid-3,  Owls  ,\n'
    )
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


def test_csv_that_is_not_utf8_is_refused_naming_its_encoding(tmp_path) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes(b"\xef\xbb\xbfvideo_id,transcript\nv1,caf\xe9 au lait\n")  # BOM, then Latin-1 bytes
    with pytest.raises(BadInput, match=r"is not UTF-8 \(byte 0xe9 on line 2\)"):
        load_transcripts_csv(path)
    french = "video_id,transcript,title\n" + "".join(
        f"v{i},Le café et la crème brûlée sont très appréciés à Paris en été,Garçon {i}\n" for i in range(40)
    )
    path.write_bytes(french.encode("cp1252"))
    with pytest.raises(
        BadInput, match=r"is not UTF-8 \(byte 0xe9 on line 2\); it looks like cp1252.*--encoding cp1252"
    ):
        load_transcripts_csv(path)
    rows = load_transcripts_csv(path, encoding="cp1252")  # what the message says to do: no text lost
    assert rows[0] == CsvTranscript("v0", "Le café et la crème brûlée sont très appréciés à Paris en été", "Garçon 0")
    with pytest.raises(BadInput, match="unknown encoding 'klingon'"):
        load_transcripts_csv(path, encoding="klingon")


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-8-sig"])
def test_csv_in_utf16_utf32_or_with_a_bom_is_read(tmp_path, codec) -> None:
    """A byte-order mark names the encoding; UTF-16 without one is told by its NUL bytes."""
    path = tmp_path / "t.csv"
    path.write_bytes("video_id,transcript,title\nv1,café ünï ✓,Tëst\n".encode(codec))
    assert load_transcripts_csv(path) == [CsvTranscript("v1", "café ünï ✓", "Tëst")]


def test_transcript_of_zero_width_characters_is_empty(tmp_path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("video_id,transcript\nzw,\u200b\u200b \u200c\u200d\ufeff\u2060\nok,\u200bhello\n", encoding="utf-8")
    assert load_transcripts_csv(path) == [CsvTranscript("zw", "", None), CsvTranscript("ok", "\u200bhello", None)]


def test_csv_without_rows_is_bad_input(tmp_path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("video_id,transcript\n")
    with pytest.raises(BadInput, match="has no rows"):
        load_transcripts_csv(path)


def test_is_blank() -> None:
    assert is_blank("") and is_blank(" \t\n") and is_blank("\u200b\u200b") and is_blank("\x01\u00ad\u202e")
    assert not is_blank("\u200bx") and not is_blank("ok")


def test_csv_row_with_an_unquoted_comma_is_bad_input(tmp_path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("video_id,transcript\nv1,fine\nv2,owls, bats and bees\n")
    with pytest.raises(BadInput, match="line 3 has 3 fields, the header 2: quote a field that contains a comma"):
        load_transcripts_csv(path)
