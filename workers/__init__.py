"""Celery workers that run edit jobs (the service issue fills this package in)."""
