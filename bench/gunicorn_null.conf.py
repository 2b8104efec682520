"""gunicorn settings for the null app, matching the gateway's where they matter.

Passed explicitly with -c: without it gunicorn would load ./gunicorn.conf.py, the gateway's.
"""
worker_class = "gevent"
workers = 1
worker_connections = 2000
keepalive = 5
control_socket_disable = True
accesslog = None
errorlog = "-"
loglevel = "warning"
