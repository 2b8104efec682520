"""Plain modules behind the Flask blueprints: configuration, relay, auth, logging, keys."""
