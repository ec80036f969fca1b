"""Kaggle's own client (the ``kaggle`` package), as the leaderboard needs it: submit a file,
list the submissions with their status and scores. Imported only when asked for.

Every failure comes back as a ``KaggleError`` whose message says what to do: the client is not
installed, there are no credentials, Kaggle cannot be reached, or Kaggle refused (a competition
rule such as the daily submission limit, in Kaggle's own words).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

CREDENTIALS = ("set KAGGLE_API_TOKEN (a token from https://www.kaggle.com/settings/api), or save it "
               "as ~/.kaggle/access_token, or put kaggle.json in ~/.kaggle, or set KAGGLE_USERNAME "
               "and KAGGLE_KEY")


class KaggleError(RuntimeError):
    """Kaggle could not be asked, or said no; the message says which and what to do."""


@dataclass(frozen=True)
class Submission:
    """One submission as Kaggle lists it; scores are None until it is scored (private: until the
    competition reveals it)."""

    ref: int | None
    description: str
    status: str  # PENDING, COMPLETE or ERROR
    public: float | None
    private: float | None
    error: str | None


def connect():
    """An authenticated ``KaggleApi``. Its import authenticates and prints a page of help when
    there are no credentials; that page is replaced by one sentence of ours."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from kaggle.api.kaggle_api_extended import KaggleApi
    except ImportError:
        raise KaggleError("submitting needs Kaggle's client: pip install 'gapstack[kaggle]' "
                          "(or pip install kaggle)") from None
    api = KaggleApi()
    with _asking("check the credentials"):
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                api.authenticate()
        except SystemExit:
            raise KaggleError(f"no usable Kaggle credentials: {CREDENTIALS}") from None
    return api


@contextlib.contextmanager
def _asking(what: str):
    """Kaggle's HTTP failures as KaggleError: no network, or Kaggle's refusal in its own words."""
    import requests

    try:
        yield
    except requests.HTTPError as exc:
        raise KaggleError(f"Kaggle refused to {what}: {exc}") from None
    except requests.RequestException as exc:
        raise KaggleError(f"cannot reach Kaggle to {what} (no network?): {type(exc).__name__}: "
                          f"{exc}") from None


def submit(api, competition: str, path: Path, description: str) -> int | None:
    """Upload ``path`` as a submission; its ref where Kaggle gives one (else it is found again
    by ``description``)."""
    with _asking(f"take {path.name}"):
        response = api.competition_submit(str(path), description, competition, quiet=True)
    if response.message == api.COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE:
        raise KaggleError(f"the upload of {path} to Kaggle did not complete; try again")
    return response.ref or None


def _score(text) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def submissions(api, competition: str, wanted, page_size: int = 50, max_pages: int = 20) -> list[Submission]:
    """The competition's submissions, newest first, page by page until ``wanted`` (a function of
    the submissions so far) says every one looked for is there, or the list ends."""
    from kagglesdk.competitions.types.submission_status import SubmissionStatus

    found: list[Submission] = []
    for page in range(1, max_pages + 1):
        with _asking("list the submissions"):
            listed = api.competition_submissions(competition, page_number=page, page_size=page_size) or []
        for s in listed:
            status = s.status.name if isinstance(s.status, SubmissionStatus) else str(s.status)
            found.append(Submission(s.ref or None, s.description or "", status, _score(s.public_score),
                                    _score(s.private_score), s.error_description or None))
        if wanted(found) or len(listed) < page_size:
            break
    return found
