"""A web page and JSON API serving a saved ensemble: P(dog) (K classes: every class's probability,
most probable first) and the class activation map of the most probable class.

    python -m stacking.serve --model OUT/model [--host 127.0.0.1] [--port 8000]

Flask (the first write-up's choice) behind waitress, a production WSGI server in pure Python
(Flask's own server says it is for development). The model is loaded once; inference runs under a
lock, since both CPU cores already go to each forward pass. Uploads stay in memory: no file name
from a request ever becomes a path.
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import math
import sys
import threading
from pathlib import Path

import numpy as np

from features.data import BytesReader, Photo
from features.extract import setup_logging
from features.images import MAX_PIXELS, ImageError, decode_rgb, resize
from stacking.cam import CamExplainer, overlay
from stacking.predict import Predictor
from stacking.submission import clip

log = logging.getLogger("gapstack")

MAX_UPLOAD_MB = 20
CAM_SIDE = 512  # the CAM image's longer side, in pixels
PAGE = Path(__file__).with_name("static") / "index.html"


class BadPhoto(ValueError):
    """An upload we cannot answer for; ``status`` is the HTTP code to send."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Service:
    """The loaded ensemble and its CAM; ``answer`` is what POST /api/predict returns."""

    def __init__(self, model_dir: str | Path, weights=None, runtime: str = "auto", model: str | None = None):
        self.predictor = Predictor(model_dir, weights, runtime, batch_size=1, streams=1)
        self.ensemble = self.predictor.ensemble
        self.cam = CamExplainer(self.ensemble, weights, runtime, model)
        self.model = self.cam.model
        self.lock = threading.Lock()

    def info(self) -> dict:
        ens = self.ensemble
        return {"model": self.model, "backbones": [b["name"] for b in ens.backbones],
                "level1": list(ens.level1), "clip": ens.clip, "max_upload_mb": MAX_UPLOAD_MB,
                "classes": list(ens.task.classes)}

    def votes(self, out: dict[str, np.ndarray], c: int = 1) -> dict[str, float]:
        """Each backbone's level-1 P(class ``c``) (two classes: P(dog)), keyed by backbone (by model
        when a backbone has several heads)."""
        names = list(self.ensemble.level1)
        backbones = [self.ensemble.backbone_of(n) for n in names]
        return {(b if backbones.count(b) == 1 else n): float(class_probabilities(out[n][0])[c])
                for n, b in zip(names, backbones)}

    def answer(self, data: bytes, filename: str = "") -> dict:
        name = _display_name(filename)
        if not data:
            raise BadPhoto(f"{name}: empty upload (0 bytes)")
        try:
            rgb = decode_rgb(data, name)
        except ImageError as exc:
            status = 413 if "too large" in exc.reason else 422
            raise BadPhoto(str(exc), status) from None
        photo = Photo(name, -1, "upload")
        reader = BytesReader({"upload": data})
        shown = _fit(rgb, CAM_SIDE)
        with self.lock:
            out, reasons = self.predictor.predict_all([photo], reader)
            if reasons[0]:
                raise BadPhoto(f"{name}: {reasons[0]}", 422)
            explanation = self.cam.explain(photo, shown.shape[:2], reader)
        p = class_probabilities(clip(out[self.model], self.ensemble.clip)[0])  # as stacking.predict clips
        classes = self.ensemble.task.classes
        shown_class = classes.index(explanation.target)
        reply = {
            "label": classes[int(np.argmax(p))],
            "probabilities": [[classes[k], float(p[k])] for k in np.argsort(-p, kind="stable")],
            "model": self.model,
            "backbones": self.votes(out, shown_class),
            "logit": _finite(explanation.logit),
            "cam": {"explains": self.model, "class": explanation.target,
                    "mean_logit": _finite(float(explanation.logit_map.mean())),
                    "weights": explanation.weights, "note": explanation.note,
                    "range": [float(explanation.logit_map.min()), float(explanation.logit_map.max())]},
            "cam_png": _png_base64(overlay(shown, explanation.logit_map)),
        }
        if len(classes) == 2:
            reply["p_dog"] = float(p[1])  # P(classes[1]): P(dog) on Dogs vs. Cats
        return reply


def class_probabilities(p) -> np.ndarray:
    """Every class's probability: (1 - p, p) from a two-class model's P(class 1), else as given."""
    p = np.asarray(p, dtype=float)
    return np.array([1.0 - p, p]) if p.ndim == 0 else p


def _display_name(filename: str) -> str:
    """The upload's name for messages only: its last path part, printable, at most 80 characters."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable())[:80]
    return base or "upload"


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _fit(rgb: np.ndarray, side: int) -> np.ndarray:
    """The photo scaled so its longer side is at most ``side`` (the CAM is drawn at this size)."""
    h, w = rgb.shape[:2]
    scale = min(1.0, side / max(h, w))
    return resize(rgb, (max(1, round(h * scale)), max(1, round(w * scale))), "area")


def _png_base64(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def create_app(service: Service):
    """The Flask app: GET / (the page), GET /api/info, POST /api/predict (multipart field ``file``)."""
    from flask import Flask, jsonify, request
    from werkzeug.exceptions import HTTPException

    app = Flask("gapstack")
    app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD_MB * 1024 * 1024

    @app.get("/")
    def page():
        return PAGE.read_text(), 200, {"Content-Type": "text/html; charset=utf-8"}

    @app.get("/api/info")
    def info():
        return jsonify(service.info())

    @app.post("/api/predict")
    def predict():
        upload = request.files.get("file")
        if upload is None:
            raise BadPhoto("no file: send the photo as multipart/form-data field 'file'")
        return jsonify(service.answer(upload.read(), upload.filename or ""))

    @app.errorhandler(BadPhoto)
    def bad_photo(exc: BadPhoto):
        return jsonify({"error": str(exc)}), exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        message = exc.description
        if exc.code == 413:
            message = f"upload over the {MAX_UPLOAD_MB} MB limit"
        return jsonify({"error": message}), exc.code

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unexpected error")
        return jsonify({"error": f"internal error: {type(exc).__name__}: {exc}"}), 500

    return app


def make_server(app, host: str = "127.0.0.1", port: int = 8000, threads: int = 8):
    """A waitress server (``.run()`` serves; port 0 picks a free port: ``.effective_port``)."""
    from waitress import create_server

    return create_server(app, host=host, port=port, threads=threads,
                         max_request_body_size=(MAX_UPLOAD_MB + 1) * 1024 * 1024)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stacking.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the model/ folder a stacking.run wrote")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    parser.add_argument("--use", default=None,
                        help="which of the ensemble's models to serve (default: the one submitted)")
    parser.add_argument("--weights", default=None, help="weights file or folder, if they have moved")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        service = Service(args.model, args.weights, model=args.use)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 2
    server = make_server(create_app(service), args.host, args.port)
    log.info("serving %s (%s) on http://%s:%s/ (photos up to %d MB, %s pixels)", args.model,
             service.model, args.host, server.effective_port, MAX_UPLOAD_MB, f"{MAX_PIXELS:,}")
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
