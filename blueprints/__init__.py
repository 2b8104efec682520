"""The app's blueprints; views reach the worker's services through `services()`."""
from flask import current_app

from gateway.services import Services


def services() -> Services:
    """The services of the app handling the current request."""
    return current_app.extensions["gateway"]
