"""Devastator: a durable messaging server on pykka actors and gevent."""
