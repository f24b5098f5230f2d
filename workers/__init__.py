"""Celery app and job execution: the store and the ML library joined together.

Torch-free imports for the API: `from workers.celery_app import enqueue_job, broker_ping,
BrokerUnavailable`. The worker process side: `workers.main.run_worker`, and
`workers.execution.execute_job` (a job as a plain function, no broker).
"""
