"""A test client that sends its requests through ``kana.wsgi.application``, gunicorn's entry.

Django's test ``Client`` calls Django's handler directly, so it never sees what is in front
of it: the lean ingest app (``segment_ingest.wsgi``). ``WsgiClient`` is that client with the
handler swapped for the WSGI app, so tests keep their assertions (``status_code``, ``json()``,
headers) whichever route answered. Like Django's ``ClientHandler``, it keeps
``close_old_connections`` off the request signals: the test's transaction holds the connection.
"""

from django.core.handlers.wsgi import WSGIRequest
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from django.http import HttpResponse
from django.test import Client


class WsgiHandler:
    def __call__(self, environ):
        from kana.wsgi import application  # imported once Django's test settings are in place

        started = {}

        def start_response(status, headers, exc_info=None):
            started["status"], started["headers"] = status, headers

        request_started.disconnect(close_old_connections)
        request_finished.disconnect(close_old_connections)
        try:
            answer = application(environ, start_response)
            try:
                content = b"".join(answer)
            finally:
                if hasattr(answer, "close"):
                    answer.close()  # what the WSGI server does once the body is sent
        finally:
            request_started.connect(close_old_connections)
            request_finished.connect(close_old_connections)
        code, _, reason = started["status"].partition(" ")
        response = HttpResponse(content, status=int(code), reason=reason)
        del response["Content-Type"]  # exactly the headers the app sent
        for name, value in started["headers"]:
            if name.lower() == "set-cookie":
                response.cookies.load(value)
            else:
                response[name] = value
        response.wsgi_request = WSGIRequest(environ)
        return response


class WsgiClient(Client):
    def __init__(self, **defaults):
        super().__init__(**defaults)
        self.handler = WsgiHandler()
