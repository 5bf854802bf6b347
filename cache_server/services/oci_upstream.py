"""The registry's pull-through mirror: manifests and blobs fetched from an upstream registry.

`slipstream serve --registry-upstream [PREFIX=]URL` (repeatable): a pull of a
repository under PREFIX/ (any repository without a prefix; the longest prefix
wins) that the store cannot answer is fetched from the registry at URL, the
repository named there without the prefix. Docker Hub's anonymous bearer-token
flow is followed (`WWW-Authenticate: Bearer realm=...`), with Basic credentials
from $SLIPSTREAM_REGISTRY_UPSTREAM_AUTH ("USER:PASSWORD") if set. What comes back is checked against
its digest before it is stored or counted as fetched.
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from slipstream.cache_server.services.common import HttpError

AUTH_ENV = "SLIPSTREAM_REGISTRY_UPSTREAM_AUTH"
DEFAULT_TAG_TTL = 300.0  # seconds a tag fetched from an upstream is served without asking again
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=5.0, sock_connect=5.0, sock_read=60.0)


@dataclass(frozen=True)
class Upstream:
    """An upstream registry and the repositories (by name prefix) it serves here."""

    prefix: str  # "" for any repository
    url: str  # e.g. https://registry-1.docker.io, without a trailing /

    def serves(self, repository: str) -> bool:
        return not self.prefix or repository.startswith(self.prefix + "/")

    def remote_name(self, repository: str) -> str:
        return repository[len(self.prefix) + 1 :] if self.prefix else repository


def parse_upstream(text: str) -> Upstream:
    """An upstream from "[PREFIX=]URL"; ValueError saying what is wrong."""
    prefix, sep, url = text.partition("=")
    if not sep:
        prefix, url = "", text
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{text!r}: the upstream must be an http:// or https:// URL")
    if prefix and not re.fullmatch(
        r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*", prefix
    ):
        raise ValueError(f"{text!r}: {prefix!r} is not a repository name prefix")
    return Upstream(prefix, url.rstrip("/"))


_DOCKER_HUB_KEY = "https://index.docker.io/v1/"  # where `docker login` keeps Docker Hub's


def read_auth_file(path: str) -> dict[str, str]:
    """Basic authorization headers by registry host from a Docker config.json; ValueError
    saying what is wrong (never the secrets)."""
    try:
        doc = json.loads(pathlib.Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    except ValueError:
        raise ValueError(f"{path}: not JSON") from None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        raise ValueError(f'{path}: no "auths" object')
    headers = {}
    for key, entry in auths.items():
        host = (
            "registry-1.docker.io"
            if key == _DOCKER_HUB_KEY
            else urlsplit(key if "://" in key else f"//{key}").netloc
        )
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: the entry of {key!r} is not an object")
        if isinstance(entry.get("auth"), str):
            encoded = entry["auth"]
        elif isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            encoded = base64.b64encode(f"{entry['username']}:{entry['password']}".encode()).decode()
        else:
            raise ValueError(
                f'{path}: the entry of {key!r} has no "auth" nor username and password'
            )
        headers[host] = f"Basic {encoded}"
    return headers


class UpstreamUnavailable(HttpError):
    """The upstream could not be asked (down, unreachable, or answering 5xx)."""

    def __init__(self, upstream: Upstream, reason: str) -> None:
        super().__init__(
            502, f"upstream {upstream.url} is unavailable: {reason}", code="UNAVAILABLE"
        )


class Upstreams:
    """The configured upstreams and one HTTP client session to them all."""

    def __init__(self, upstreams: Sequence[Upstream], auth_file: str | None = None) -> None:
        self.upstreams = sorted(upstreams, key=lambda u: -len(u.prefix))
        self._session: aiohttp.ClientSession | None = None
        self._tokens: dict[tuple[str, str], str] = {}
        auth = os.environ.get(AUTH_ENV)
        self._any_basic = (
            "Basic " + base64.b64encode(auth.encode()).decode() if auth and ":" in auth else None
        )
        self._basic_by_host = read_auth_file(auth_file) if auth_file else {}

    def _basic(self, upstream: Upstream) -> str | None:
        return self._basic_by_host.get(urlsplit(upstream.url).netloc, self._any_basic)

    def for_repository(self, repository: str) -> Upstream | None:
        return next((u for u in self.upstreams if u.serves(repository)), None)

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=_TIMEOUT, auto_decompress=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        upstream: Upstream,
        repository: str,
        path: str,
        headers: dict[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """method /v2/NAME/path on the upstream, through its token flow; the response is
        the caller's to release. UpstreamUnavailable if it cannot be asked."""
        name = upstream.remote_name(repository)
        url = f"{upstream.url}/v2/{name}/{path}"
        key = (upstream.url, name)
        for attempt in range(2):
            sent = dict(headers or {})
            token = self._tokens.get(key)
            if token is not None:
                sent["Authorization"] = f"Bearer {token}"
            elif (basic := self._basic(upstream)) is not None:
                sent["Authorization"] = basic
            try:
                response = await self.session().request(method, url, headers=sent)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                raise UpstreamUnavailable(upstream, type(exc).__name__ + f" {exc}"[:200]) from None
            if response.status == 401 and attempt == 0:
                challenge = response.headers.get("WWW-Authenticate", "")
                response.release()
                if challenge.lower().startswith("bearer "):
                    self._tokens[key] = await self._token(upstream, name, challenge)
                    continue
            if response.status >= 500:
                response.release()
                raise UpstreamUnavailable(upstream, f"it answered {response.status}")
            return response
        raise AssertionError("unreachable")

    async def _token(self, upstream: Upstream, name: str, challenge: str) -> str:
        params = dict(_CHALLENGE_PARAM.findall(challenge))
        realm = params.pop("realm", "")
        if not realm.startswith(("http://", "https://")):
            raise UpstreamUnavailable(upstream, "its token realm is not an http(s) URL")
        query = {"scope": f"repository:{name}:pull"}
        if "service" in params:
            query["service"] = params["service"]
        basic = self._basic(upstream)
        headers = {"Authorization": basic} if basic else {}
        try:
            async with self.session().get(realm, params=query, headers=headers) as response:
                if response.status != 200:
                    raise UpstreamUnavailable(
                        upstream, f"its token service answered {response.status}"
                    )
                answer = await response.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            raise UpstreamUnavailable(upstream, f"its token service failed: {exc}"[:200]) from None
        token = (
            answer.get("token") or answer.get("access_token") if isinstance(answer, dict) else None
        )
        if not isinstance(token, str) or not token:
            raise UpstreamUnavailable(upstream, "its token service gave no token")
        return token
