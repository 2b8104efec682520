"""Facts about the process the gateway runs in."""


def gevent_patched() -> bool:
    """True on a gunicorn gevent worker (sockets patched): background greenlets may be used."""
    try:
        from gevent import monkey
    except ImportError:
        return False
    return monkey.is_module_patched("socket")
