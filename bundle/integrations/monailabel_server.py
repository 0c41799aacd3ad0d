"""The ASGI app ``label_serve`` runs: MONAI Label's FastAPI app behind the bundle's request checks.

MONAI Label's server runs ``--uvicorn_app`` (default ``monailabel.app:app``); the app cannot take a
middleware once it has started, and the MONAI Label app (``main.py``) is loaded only then, so the
checks are added here, when uvicorn imports this module (see
:class:`bundle.integrations.monailabel_app.RequestChecks`).
"""

from __future__ import annotations

from monailabel.app import app

from bundle.integrations.monailabel_app import RequestChecks

app.add_middleware(RequestChecks)

__all__ = ["app"]
