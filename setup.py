from setuptools import find_packages, setup

setup(
    name="devastator",
    version="0.1.0",
    description="A durable messaging server: JSON-RPC over TLS and WebSocket, on pykka actors and gevent",
    packages=find_packages(include=["devastator", "devastator.*"]),
    python_requires=">=3.11",
    install_requires=[
        "pykka",
        "gevent",
        "h11",
        "wsproto",
        "orjson",
        "PyJWT",
        "cryptography",
        "websocket-client",
    ],
    scripts=["bin/devastator", "bin/devastator-console"],
)
