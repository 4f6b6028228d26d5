"""WSGI entry point for production servers, configured from the environment.

    gunicorn --preload -w 2 --threads 8 -b 127.0.0.1:8080 'nomyo.server.wsgi:create_app()'
    waitress-serve --listen=127.0.0.1:8080 --call nomyo.server.wsgi:create_app

Environment: NOMYO_BACKEND (echo | http://host:port), NOMYO_KEY_FILE, NOMYO_KEY_PASSWORD,
NOMYO_API_KEY_FILE, NOMYO_TIER_POLICY, NOMYO_RATE_LIMIT, NOMYO_BACKEND_TIMEOUT.
Without NOMYO_KEY_FILE the key is ephemeral: with several worker processes use a key file
(or gunicorn --preload) so that every worker serves the same key.
"""

from __future__ import annotations

import os

from nomyo.memory import harden_process
from nomyo.protocol.constants import DEFAULT_BACKEND_TIMEOUT
from nomyo.server.app import SecureCompletionApp
from nomyo.server.factory import create_app as _create_app


def create_app() -> SecureCompletionApp:
    """The WSGI application (a callable `app(environ, start_response)`).

    Hardens the hosting process first (no core dumps, not dumpable), like `nomyo serve`.
    """
    harden_process()
    env = os.environ
    rate = env.get("NOMYO_RATE_LIMIT")
    return _create_app(
        backend=env.get("NOMYO_BACKEND", "echo"),
        key_file=env.get("NOMYO_KEY_FILE") or None,
        key_password=env.pop("NOMYO_KEY_PASSWORD", None) or None,  # not left in the env
        api_key_file=env.get("NOMYO_API_KEY_FILE") or None,
        tier_policy_file=env.get("NOMYO_TIER_POLICY") or None,
        rate_limit=float(rate) if rate else None,
        backend_timeout=float(env.get("NOMYO_BACKEND_TIMEOUT") or DEFAULT_BACKEND_TIMEOUT),
    )
