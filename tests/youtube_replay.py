"""Test-only: answer YouTube's HTTP requests from recordings, for the real youtube-transcript-api and
the real yt-dlp. Nothing here touches the network, and production code never imports this module.

- ``ReplayAdapter``: a ``requests`` transport adapter, mounted on the Session handed to
  ``YouTubeTranscriptApi(http_client=...)``. Each video id follows a named *scenario* (which
  recording the watch page, the innertube player call and the caption track get).
- ``worker_app``: ``celery -A tests.youtube_replay:worker_app worker ...`` is tubesum's Celery app
  with every fetch answered by a ReplayAdapter, configured by ``TUBESUM_YOUTUBE_REPLAY`` (a JSON
  file: ``{"videos": {"<id>": "<scenario>"}, "default": "ok", "slow_s": 2.0}``). Without the variable the
  attribute refuses to load.
- ``ReplayRH`` / ``replay_ydl``: a yt-dlp RequestHandler serving recorded pages, installed as the
  only handler of one ``YoutubeDL``; ``playlist_page`` builds a playlist page around ``ytInitialData``.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests
from requests.adapters import BaseAdapter

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "youtube"
REPLAY_ENV = "TUBESUM_YOUTUBE_REPLAY"
# The video id inside the recorded caption URLs (youtube.innertube.json was recorded for it).
RECORDED_VIDEO_ID = "GJLlxj_dtq8"


@dataclass(frozen=True)
class Step:
    """One recorded answer: a fixture file, or just a status code."""

    file: str | None = None
    status: int = 200
    content_type: str = "text/html; charset=utf-8"


def html(name: str) -> Step:
    return Step(name)


def innertube(name: str) -> Step:
    return Step(name, content_type="application/json")


OK_WATCH = html("youtube.html")
OK_PLAYER = innertube("youtube.innertube.json")
OK_CAPTIONS = Step("transcript.xml", content_type="text/xml; charset=utf-8")


@dataclass(frozen=True)
class Scenario:
    """What YouTube answers for one video; a list answers successive calls (the last one repeats)."""

    watch: tuple[Step, ...] = (OK_WATCH,)
    player: tuple[Step, ...] = (OK_PLAYER,)
    captions: tuple[Step, ...] = (OK_CAPTIONS,)


SCENARIOS: dict[str, Scenario] = {
    "ok": Scenario(),
    "consent": Scenario(watch=(html("youtube_consent_page.html"), OK_WATCH)),
    "consent_refused": Scenario(watch=(html("youtube_consent_page.html"),)),
    "too_many_requests": Scenario(watch=(html("youtube_too_many_requests.html"),)),
    "http_429": Scenario(watch=(Step(status=429),)),
    "flaky_429": Scenario(watch=(Step(status=429), OK_WATCH)),  # first try blocked, then fine
    "request_blocked": Scenario(player=(innertube("youtube_request_blocked.innertube.json"),)),
    "age_restricted": Scenario(player=(innertube("youtube_age_restricted.innertube.json"),)),
    "unplayable": Scenario(player=(innertube("youtube_unplayable.innertube.json"),)),
    "unavailable": Scenario(player=(innertube("youtube_video_unavailable.innertube.json"),)),
    "transcripts_disabled": Scenario(player=(innertube("youtube_transcripts_disabled.innertube.json"),)),
    "server_error": Scenario(player=(Step(status=500),)),
}


@dataclass
class Call:
    method: str
    url: str
    timeout: Any
    headers: dict[str, str]


@dataclass
class ReplayAdapter(BaseAdapter):
    """Answers www.youtube.com's watch page, innertube player and timedtext requests from FIXTURES."""

    scenario_for: dict[str, str] = field(default_factory=dict)  # video id → scenario name
    default: str = "ok"
    fixtures: Path = FIXTURES
    calls: list[Call] = field(default_factory=list)
    # Scenario "slow": the "ok" answers, with the watch page this many seconds late (a fetch to kill).
    slow_s: float = 2.0

    def __post_init__(self) -> None:
        super().__init__()
        self._counts: dict[tuple[str, str], int] = defaultdict(int)
        self._lock = threading.Lock()
        self._last_video: str | None = None

    def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):  # type: ignore[no-untyped-def]
        self.calls.append(Call(request.method, request.url, timeout, dict(request.headers)))
        url = urlsplit(request.url)
        query = parse_qs(url.query)
        if url.path == "/watch":
            kind, video_id = "watch", query.get("v", [""])[0]
        elif url.path == "/youtubei/v1/player":
            kind, video_id = "player", json.loads(request.body or b"{}").get("videoId", "")
        elif url.path == "/api/timedtext":
            # The recorded caption URLs all name the recorded video: use the video of the last list().
            kind, video_id = "captions", self._last_video or query.get("v", [""])[0]
        else:
            return self._response(request, Step(status=404))
        if kind == "watch":
            self._last_video = video_id
        name = self.scenario_for.get(video_id, self.default)
        if name == "dns_failure":  # offline: a real lookup of a name that never resolves (RFC 6761)
            return requests.Session().get("https://www.youtube.invalid/watch", timeout=5)
        if name == "slow":
            if kind == "watch":
                time.sleep(self.slow_s)
            name = "ok"
        scenario = SCENARIOS[name]
        steps: tuple[Step, ...] = getattr(scenario, kind)
        with self._lock:
            n = self._counts[(video_id, kind)]
            self._counts[(video_id, kind)] += 1
        return self._response(request, steps[min(n, len(steps) - 1)])

    def _response(self, request: requests.PreparedRequest, step: Step) -> requests.Response:
        response = requests.Response()
        response.status_code = step.status
        response.reason = "OK" if step.status < 400 else "Error"
        response.url = request.url or ""
        response.request = request
        response.headers["Content-Type"] = step.content_type
        response._content = (self.fixtures / step.file).read_bytes() if step.file else b""  # noqa: SLF001
        response.encoding = "utf-8"
        return response

    def close(self) -> None:
        pass


def mount_replay(session: requests.Session, adapter: ReplayAdapter) -> requests.Session:
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


# --- a Celery app whose fetches answer from recordings -----------------------------------------------


def install_worker_replay() -> Any:
    """Patch workers.fetch.make_http_session (in this worker process only) to mount a ReplayAdapter."""
    import tubesum.workers.fetch as fetch

    config = json.loads(Path(os.environ[REPLAY_ENV]).read_text())
    adapter = ReplayAdapter(
        scenario_for=config.get("videos", {}), default=config.get("default", "ok"), slow_s=config.get("slow_s", 2.0)
    )
    real_make_http_session = fetch.make_http_session

    def replaying_session(settings):  # type: ignore[no-untyped-def]
        return mount_replay(real_make_http_session(settings), adapter)

    fetch.make_http_session = replaying_session
    from tubesum.celery_app import TASK_MODULES, app

    # Only the fetch task matters here; skip task modules other areas have not written yet.
    app.conf.include = [m for m in TASK_MODULES if importlib.util.find_spec(m) is not None]
    return app


def __getattr__(name: str) -> Any:
    if name == "worker_app":
        if REPLAY_ENV not in os.environ:
            raise AttributeError(f"worker_app needs {REPLAY_ENV} (a JSON file of video scenarios)")
        return install_worker_replay()
    raise AttributeError(name)


# --- yt-dlp ------------------------------------------------------------------------------------------


def playlist_initial_data(
    playlist_id: str, title: str, videos: list[tuple[str, str]], *, alerts: list[tuple[str, str]] = ()
) -> dict:
    """A minimal ``ytInitialData`` of youtube.com/playlist?list=…: the selected tab holding a
    ``playlistVideoListRenderer`` of ``playlistVideoRenderer`` entries, as YouTube sends it."""
    entries = [
        {
            "playlistVideoRenderer": {
                "videoId": vid,
                "title": {"runs": [{"text": vtitle}]},
                "index": {"simpleText": str(i + 1)},
                "lengthSeconds": str(60 + i),
                "lengthText": {"simpleText": f"1:{i:02d}"},
                "isPlayable": not vtitle.startswith("["),
                "navigationEndpoint": {
                    "commandMetadata": {
                        "webCommandMetadata": {"url": f"/watch?v={vid}&list={playlist_id}&index={i + 1}"}
                    },
                    "watchEndpoint": {"videoId": vid, "playlistId": playlist_id, "index": i},
                },
            }
        }
        for i, (vid, vtitle) in enumerate(videos)
    ]
    data: dict[str, Any] = {
        "responseContext": {"visitorData": "CgtyZXBsYXllZA%3D%3D"},
        "metadata": {"playlistMetadataRenderer": {"title": title}},
        "header": {
            "playlistHeaderRenderer": {
                "playlistId": playlist_id,
                "title": {"simpleText": title},
                "privacy": "PUBLIC",
                "numVideosText": {"runs": [{"text": f"{len(videos)} videos"}]},
            }
        },
        "contents": {
            "twoColumnBrowseResultsRenderer": {
                "tabs": [
                    {
                        "tabRenderer": {
                            "selected": True,
                            "content": {
                                "sectionListRenderer": {
                                    "contents": [
                                        {
                                            "itemSectionRenderer": {
                                                "contents": [
                                                    {
                                                        "playlistVideoListRenderer": {
                                                            "playlistId": playlist_id,
                                                            "contents": entries,
                                                        }
                                                    }
                                                ]
                                            }
                                        }
                                    ]
                                }
                            },
                        }
                    }
                ]
            }
        },
    }
    if alerts:
        data = {
            "responseContext": data["responseContext"],
            "alerts": [{"alertRenderer": {"type": kind, "text": {"runs": [{"text": text}]}}} for kind, text in alerts],
        }
    return data


def playlist_page(initial_data: dict) -> bytes:
    """The HTML page yt-dlp downloads: ytcfg and ytInitialData inline, as on youtube.com."""
    ytcfg = {
        "INNERTUBE_API_KEY": "AIzaSyAO_FJ2SlqU8Q4STEHLGCilw_Y9_11qcW8",
        "INNERTUBE_CLIENT_NAME": "WEB",
        "INNERTUBE_CLIENT_VERSION": "2.20251120.01.00",
        "INNERTUBE_CONTEXT_CLIENT_NAME": 1,
        "VISITOR_DATA": "CgtyZXBsYXllZA%3D%3D",
    }
    return (
        "<!DOCTYPE html><html><head><title>YouTube</title>"
        f"<script>ytcfg.set({json.dumps(ytcfg)});</script></head><body>"
        f"<script>var ytInitialData = {json.dumps(initial_data)};</script>"
        "</body></html>"
    ).encode()


def _make_replay_rh() -> type:
    from yt_dlp.networking.common import Features, RequestHandler, Response
    from yt_dlp.networking.exceptions import HTTPError

    class ReplayRH(RequestHandler):
        """Answers yt-dlp's requests from ``pages``: (method, path+query prefix) → (status, body)."""

        _SUPPORTED_URL_SCHEMES = ("http", "https")
        _SUPPORTED_PROXY_SCHEMES = None
        _SUPPORTED_FEATURES = (Features.NO_PROXY, Features.ALL_PROXY)

        def __init__(self, *, pages: dict[tuple[str, str], tuple[int, bytes]], calls: list, **kwargs: Any):
            super().__init__(**kwargs)
            self.pages, self.calls = pages, calls

        def _check_extensions(self, extensions: dict) -> None:
            extensions.clear()  # cookiejar, timeout, impersonate...: meaningless for a recording

        def _send(self, request):  # type: ignore[no-untyped-def]
            url = urlsplit(request.url)
            self.calls.append((request.method, request.url))
            target = url.path + ("?" + url.query if url.query else "")
            for (method, prefix), (status, body) in self.pages.items():  # noqa: B007 - used after the break
                if request.method == method and target.startswith(prefix):
                    break
            else:
                status, body = 404, b"not recorded"
            response = Response(io.BytesIO(body), request.url, {"Content-Type": "text/html; charset=utf-8"}, status)
            if status >= 400:
                raise HTTPError(response)
            return response

    return ReplayRH


def replay_ydl(pages: dict[tuple[str, str], tuple[int, bytes]], calls: list | None = None):  # type: ignore[no-untyped-def]
    """A ``make_ydl`` factory for producer.sources: a real YoutubeDL whose only request handler
    answers from ``pages``; any request not recorded gets a 404, never the network."""
    from yt_dlp import YoutubeDL
    from yt_dlp.networking.common import RequestDirector

    rh_class = _make_replay_rh()
    calls = calls if calls is not None else []

    def make(options: dict) -> YoutubeDL:
        ydl = YoutubeDL({**options, "extractor_retries": 0})
        director = RequestDirector(logger=ydl)
        director.add_handler(rh_class(pages=pages, calls=calls, logger=ydl))
        ydl.__dict__["_request_director"] = director  # replaces the cached_property's network handlers
        return ydl

    return make


def fetch_worker_argv(name: str, *, pool: str = "threads", concurrency: int = 2) -> list[str]:
    """A real fetch worker (`celery worker` on the transcripts queue) whose YouTube is the replay."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tests.youtube_replay:worker_app",
        "worker",
        "-Q",
        "transcripts",
        "-P",
        pool,
        "-c",
        str(concurrency),
        "-n",
        f"{name}@%h",
        "-E",
        "--without-mingle",
        "--without-gossip",
        "-l",
        "info",
    ]
