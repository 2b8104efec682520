"""Flask blueprints: thin views over the modules in `gateway/`."""
