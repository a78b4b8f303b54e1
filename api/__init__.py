"""The REST API under ``/api/v1/``: a thin edge over the users and features services.

``base`` holds the one view class every endpoint derives from (tenant scoping, domain errors,
pagination); ``serializers`` translate JSON to service arguments and models back to JSON;
``views`` are the endpoints; ``schema`` the OpenAPI extras (auth scheme, error responses).
"""
