"""Kana settings: one plain file, every deployment knob read from the environment.

Bad values fail loudly at start-up rather than at the first request.
The embedded default (no environment at all, ``KANA_DEBUG=1``) is SQLite with Celery tasks
run in-process; production sets DATABASE_URL (PostgreSQL), REDIS_URL and SECRET_KEY.
"""

import os
from pathlib import Path

import dj_database_url
import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

# `make run` writes .env (KANA_DEBUG=1 and a generated SECRET_KEY) so that every manage.py
# command works in that checkout as the README writes it. A variable set in the environment
# wins over the file. Production sets the environment and has no .env; KANA_ENV_FILE names
# another file (or /dev/null for none).
ENV_FILE = Path(os.environ.get("KANA_ENV_FILE") or BASE_DIR / ".env")
if ENV_FILE.is_file():
    environ.Env.read_env(ENV_FILE)


# Strict on purpose, unlike environ.Env.bool (which reads "maybe" as False) and Env.int
# (whose error does not name the variable): a typo must stop the start-up.
def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (1/0, true/false), got {raw!r}")


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}") from None


DEBUG = env_bool("KANA_DEBUG", False)

SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY must be set when KANA_DEBUG is off")
    SECRET_KEY = "insecure-development-key-only-used-with-KANA_DEBUG"

ALLOWED_HOSTS = [h.strip() for h in os.environ.get("ALLOWED_HOSTS", "*" if DEBUG else "").split(",") if h.strip()]
CSRF_TRUSTED_ORIGINS = [o.strip() for o in os.environ.get("CSRF_TRUSTED_ORIGINS", "").split(",") if o.strip()]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "kana",
    "users",
    "features",
    "entitlements",
    "webhooks",
    "segment_ingest",
    "api",
    "dashboard",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # REST API and dashboard: database unreachable -> 503 with Retry-After, not 500.
    "kana.middleware.DatabaseUnavailableMiddleware",
]

ROOT_URLCONF = "kana.urls"
WSGI_APPLICATION = "kana.wsgi.application"
# The hot endpoints answered in front of Django's request handling (kana/wsgi.py puts the
# lean front, kana.lean, before the handler with these route tables): the ingest POSTs and the
# entitlement check and consume. KANA_LEAN_INGEST=0 / KANA_LEAN_API=0 send them through
# Django's views instead, with the same answers.
KANA_LEAN_ROUTES = [
    *(["segment_ingest.wsgi.ROUTES"] if env_bool("KANA_LEAN_INGEST", True) else []),
    *(["api.lean.ROUTES"] if env_bool("KANA_LEAN_API", True) else []),
]

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
            # The dashboard's filters, in every dashboard template without a {% load %}.
            "builtins": ["dashboard.templatetags.kana_dashboard"],
        },
    },
]

# --- Database -------------------------------------------------------------------------
DEFAULT_SQLITE_PATH = BASE_DIR / "var" / "kana.sqlite3"
DATABASE_URL = os.environ.get("DATABASE_URL") or f"sqlite:///{DEFAULT_SQLITE_PATH}"
# Persistent connections, renewed every 10 minutes. A worker's connections are opened on its
# first requests, so all the workers of one server reach their age together and reconnect
# together; each new connection costs its first request about 20 ms more (a new backend, cold
# caches), and the server's other requests queue behind the four at once. At 60 s that was the
# open-loop benchmark's slowest requests, to the millisecond (docs/performance-history.md, "Round 9: tails").
DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=env_int("DB_CONN_MAX_AGE", 600))}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DEFAULT_SQLITE_PATH.parent.mkdir(exist_ok=True)
    # IMMEDIATE takes SQLite's write lock at BEGIN, so every transaction is serialised:
    # the embedded database then gives the same exactness as PostgreSQL's row locks.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
elif DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
    raise ImproperlyConfigured("DATABASE_URL must be a postgres:// or sqlite:// URL")
else:
    # Django's backend with a health check read from the socket instead of a SELECT 1 per
    # request (kana/db/postgresql/base.py); the vendor and every feature are Django's own.
    DATABASES["default"]["ENGINE"] = "kana.db.postgresql"
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    # A request that waits this long for a lock answers 429 (Segment retries it) instead of
    # holding a server worker indefinitely.
    DATABASES["default"].setdefault("OPTIONS", {})["options"] = (
        f"-c lock_timeout={env_int('DB_LOCK_TIMEOUT_MS', 10000)}"
    )
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Celery ---------------------------------------------------------------------------
REDIS_URL = os.environ.get("REDIS_URL", "")
CELERY_BROKER_URL = REDIS_URL or "memory://"
# Without a broker, tasks run in-process (the embedded default); with one, in workers.
CELERY_TASK_ALWAYS_EAGER = not REDIS_URL
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Publishing must not hang a request when Redis is down: the job row is already saved and
# the sweeper re-enqueues it once the broker is back. max_retries=0: kombu otherwise retries
# the connection with growing sleeps (about 6 s per publish with Redis refusing connections).
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": 3600,
    "socket_connect_timeout": 2,
    "socket_timeout": 5,
    "max_retries": 0,
}
CELERY_TASK_PUBLISH_RETRY = False
# The sweepers share one interval: each re-sends work a lost message or a dead worker left behind.
SWEEP_INTERVAL_SECONDS = float(env_int("KANA_SWEEP_INTERVAL_SECONDS", 15))
CELERY_BEAT_SCHEDULE = {
    "sweep-stalled-jobs": {
        "task": "features.tasks.sweep_stalled_jobs",
        "schedule": SWEEP_INTERVAL_SECONDS,
    },
    "sweep-stalled-imports": {
        "task": "users.tasks.sweep_stalled_imports",
        "schedule": SWEEP_INTERVAL_SECONDS,
    },
    "sweep-expired-reservations": {
        "task": "entitlements.tasks.sweep_expired_reservations",
        "schedule": SWEEP_INTERVAL_SECONDS,
    },
    "notify-usage-thresholds": {
        "task": "entitlements.tasks.notify_thresholds",
        "schedule": float(env_int("KANA_THRESHOLD_INTERVAL_SECONDS", 5)),
    },
    # Held anonymous events past their workspace's hold window expire (SPEC §12).
    "expire-pending-anonymous-events": {
        "task": "features.tasks.expire_pending_anonymous_events",
        "schedule": float(env_int("KANA_EXPIRE_PENDING_INTERVAL_SECONDS", 3600)),
    },
    # Webhook retries, and first attempts whose message was lost: due deliveries are in the
    # database (webhooks.delivery), so they survive any worker or broker restart.
    "send-due-webhooks": {
        "task": "webhooks.tasks.send_due_deliveries",
        "schedule": SWEEP_INTERVAL_SECONDS,
    },
    "prune-webhook-history": {
        "task": "webhooks.tasks.prune_history",
        "schedule": 24 * 3600.0,
    },
}
# Fractions of a budget whose crossing is notified (usage.threshold_reached; 1.0 also sends
# usage.limit_reached), once per subject, feature, period and threshold.
KANA_USAGE_THRESHOLDS = (0.8, 1.0)
# A running job whose heartbeat is older than this is presumed dead and re-enqueued.
KANA_JOB_STALE_SECONDS = env_int("KANA_JOB_STALE_SECONDS", 60)

# --- Kana ----------------------------------------------------------------------------
# How long an API key lookup is cached per process. Revocation takes effect within it.
KANA_API_KEY_CACHE_SECONDS = env_int("KANA_API_KEY_CACHE_SECONDS", 5)
# Background jobs (reprocessing, CSV imports) one workspace may run at once, each kind: the
# rest wait, so one workspace's backfill cannot hold every worker.
KANA_JOBS_PER_WORKSPACE = env_int("KANA_JOBS_PER_WORKSPACE", 1)
# Rows per reprocessing chunk: one chunk holds the events' properties in memory.
KANA_REPROCESS_CHUNK_SIZE = env_int("KANA_REPROCESS_CHUNK_SIZE", 5000)
# Parts a large reprocessing job is created as, so as many workers can run one rule's job at
# once (PostgreSQL runs a chunk on one backend, one core); the parts share the job's range a
# chunk of candidates at a time. Only ranges of more than KANA_REPROCESS_PART_MIN_CHUNKS
# chunks of ids per part are split.
KANA_REPROCESS_PARTS = env_int("KANA_REPROCESS_PARTS", 2)
KANA_REPROCESS_PART_MIN_CHUNKS = env_int("KANA_REPROCESS_PART_MIN_CHUNKS", 4)
# CSV imports with more rows than this run in a Celery worker instead of the request.
KANA_CSV_INLINE_MAX_ROWS = env_int("KANA_CSV_INLINE_MAX_ROWS", 2000)
# Webhook deliveries: a POST waits this long for an answer; a failed one is retried after
# BASE seconds, doubling up to MAX (each with jitter), until RETRY_WINDOW after the event.
KANA_WEBHOOK_TIMEOUT_SECONDS = env_int("KANA_WEBHOOK_TIMEOUT_SECONDS", 10)
KANA_WEBHOOK_BACKOFF_BASE_SECONDS = env_int("KANA_WEBHOOK_BACKOFF_BASE_SECONDS", 30)
KANA_WEBHOOK_BACKOFF_MAX_SECONDS = env_int("KANA_WEBHOOK_BACKOFF_MAX_SECONDS", 3600)
KANA_WEBHOOK_RETRY_WINDOW_SECONDS = env_int("KANA_WEBHOOK_RETRY_WINDOW_SECONDS", 24 * 3600)
# Webhook events, deliveries and attempts older than this are pruned daily (webhooks.retention);
# 0 keeps them forever.
KANA_WEBHOOK_HISTORY_DAYS = env_int("KANA_WEBHOOK_HISTORY_DAYS", 30)
# An egress proxy for deliveries (e.g. one that keeps them off the internal network); by
# default they go straight out, whatever http_proxy says.
KANA_WEBHOOK_PROXY = os.environ.get("KANA_WEBHOOK_PROXY", "")
# Whether endpoint URLs may name loopback, private or link-local addresses (the cloud metadata
# service among them). Off in production: a customer's URL must not reach Kana's own network.
KANA_WEBHOOK_ALLOW_PRIVATE_ADDRESSES = env_bool("KANA_WEBHOOK_ALLOW_PRIVATE_ADDRESSES", DEBUG)
# CSV files waiting for a worker and import reports are kept in the default storage (here a
# directory). Workers on other machines need it shared: point STORAGES["default"] at it.
MEDIA_ROOT = Path(os.environ.get("KANA_MEDIA_ROOT") or BASE_DIR / "var" / "media")

# --- Auth, i18n, static ---------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATIC_ROOT.mkdir(exist_ok=True)  # whitenoise expects it; collectstatic fills it in production
WHITENOISE_USE_FINDERS = True
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
# Large CSV uploads go to a temporary file, never into memory.
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
DATA_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024

if not DEBUG:
    SESSION_COOKIE_SECURE = env_bool("SECURE_COOKIES", True)
    CSRF_COOKIE_SECURE = env_bool("SECURE_COOKIES", True)

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["api.auth.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["api.auth.HasWorkspace"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "api.schema.KanaAutoSchema",
    "EXCEPTION_HANDLER": "api.auth.exception_handler",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Kana API",
    "DESCRIPTION": "Users, features, mapping rules, usage and merges of one Kana workspace.",
    "VERSION": "1.0.0",
    # 3.1 (JSON Schema 2020-12): ``propertyNames``, ``if``/``then`` and ``contains`` state rules
    # the API enforces (no NUL in any key, a condition's value by operator) that 3.0 cannot.
    "OAS_VERSION": "3.1.0",
    # Requests and answers as separate components: a request states what the API accepts
    # (patterns, cross-field rules), which is not what it answers.
    "COMPONENT_SPLIT_REQUEST": True,
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
        }
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "json"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
