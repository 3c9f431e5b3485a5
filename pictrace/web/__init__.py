"""The FastAPI app: JSON API, Jinja pages, and the one place errors become HTTP statuses."""

from pictrace.web.app import create_app

__all__ = ["create_app"]
