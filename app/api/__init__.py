"""HTTP: routing, request/response schemas, error mapping. No torch is imported here."""

from app.api.main import create_app

__all__ = ["create_app"]
