"""A local stand-in for the Kaggle endpoints that ``kaggle competitions submit`` and
``kaggle competitions submissions`` call, served on http://localhost (port 80), where the real
``kaggle`` client goes with ``KAGGLE_API_ENVIRONMENT=LOCALHOST``.

It keeps what was uploaded and scores it as Kaggle does: a submission is PENDING for the first
``pending_looks`` lists after it is made, then COMPLETE with the log loss of its file against the
stand-in's labels (public: the first half of the ids, private: the rest), or ERROR when the file
is not ``id,label`` for every test id. After ``daily_limit`` submissions it refuses more, in
Kaggle's words.
"""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
from sklearn.metrics import log_loss

API = "/api/v1/"
TOKEN = "stand-in-token"
LIMIT_MESSAGE = "Your team has used its daily Submission allowance ({n}) today, please try again tomorrow UTC"


def expected_scores(data: bytes, labels: dict[int, int]) -> tuple[float, float]:
    """(public, private) log loss of a submission file, as the stand-in scores it."""
    sub = pd.read_csv(io.BytesIO(data)).set_index("id")
    ids = sorted(labels)
    half = len(ids) // 2
    y = np.array([labels[i] for i in ids])
    p = sub.loc[ids, "label"].to_numpy()
    return (round(log_loss(y[:half], p[:half], labels=[0, 1]), 5),
            round(log_loss(y[half:], p[half:], labels=[0, 1]), 5))


class StandIn:
    def __init__(self, labels: dict[int, int], daily_limit: int = 10, pending_looks: int = 1,
                 port: int = 80):
        self.labels, self.daily_limit, self.pending_looks = labels, daily_limit, pending_looks
        self.uploads: dict[str, bytes] = {}
        self.submissions: list[dict] = []  # oldest first
        self.calls: list[str] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _score(self, sub: dict) -> dict:
        data = self.uploads[sub["token"]]
        try:
            df = pd.read_csv(io.BytesIO(data))
            if list(df.columns) != ["id", "label"] or sorted(df["id"]) != sorted(self.labels):
                raise ValueError(f"Submission must have {len(self.labels)} rows, one per id, with "
                                 "columns id,label")
            public, private = expected_scores(data, self.labels)
        except (ValueError, KeyError) as exc:
            return {"status": "ERROR", "errorDescription": str(exc)}
        return {"status": "COMPLETE", "publicScore": f"{public:.5f}", "privateScore": f"{private:.5f}"}

    def answer(self, method: str, path: str, body: bytes, auth: str | None) -> tuple[int, dict | None]:
        with self.lock:
            self.calls.append(path.rsplit("/", 1)[-1])
            if method == "PUT" and path.startswith("/upload/"):
                self.uploads[path.rsplit("/", 1)[-1]] = body
                return 200, None
            request = json.loads(body or b"{}")
            if path == API + "security.OAuthService/IntrospectToken":
                ok = request.get("token") == TOKEN
                return 200, {"active": ok, "username": "tester" if ok else ""}
            if not auth:
                return 401, {"code": 401, "message": "Unauthenticated"}
            service = API + "competitions.CompetitionApiService/"
            if path == service + "StartSubmissionUpload":
                token = f"blob{len(self.uploads) + len(self.submissions) + 1}"
                return 200, {"token": token, "createUrl": f"http://localhost/upload/{token}"}
            if path == service + "CreateSubmission":
                if len(self.submissions) >= self.daily_limit:
                    return 400, {"code": 400, "message": LIMIT_MESSAGE.format(n=self.daily_limit)}
                ref = 50_000 + len(self.submissions)
                self.submissions.append({"ref": ref, "token": request["blobFileTokens"],
                                         "description": request.get("submissionDescription", ""),
                                         "looks": 0})
                return 200, {"message": "Successfully submitted to Dogs vs. Cats Redux", "ref": ref}
            if path == service + "ListSubmissions":
                page, size = int(request.get("page", 1)), int(request.get("pageSize", 20))
                newest = self.submissions[::-1][(page - 1) * size:page * size]
                listed = []
                for sub in newest:
                    sub["looks"] += 1
                    state = ({"status": "PENDING"} if sub["looks"] <= self.pending_looks
                             else self._score(sub))
                    listed.append({"ref": sub["ref"], "description": sub["description"],
                                   "fileName": "submission.csv", **state})
                return 200, {"submissions": listed}
            return 404, {"code": 404, "message": f"no such endpoint {path}"}

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, method):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                code, payload = standin.answer(method, self.path, body, self.headers.get("Authorization"))
                data = json.dumps(payload).encode() if payload is not None else b""
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                self._serve("POST")

            def do_PUT(self):
                self._serve("PUT")

            def log_message(self, *args):
                pass

        return Handler
