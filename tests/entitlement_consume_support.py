"""Parallel API calls for the concurrency tests: one thread and database connection each."""

import threading
from concurrent.futures import ThreadPoolExecutor

from django.db import connections

from .api_support import ApiClient


def in_parallel(tenant, calls):
    """Run each ``call(api_client)`` at once, one thread and database connection each."""
    barrier = threading.Barrier(len(calls))

    def run(call):
        try:
            client = ApiClient(tenant)
            client.client.raise_request_exception = False
            barrier.wait(timeout=30)
            response = call(client)
            return response.status_code, response.json()
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(run, calls))
