"""Slipstream: fast CI pipelines.

The import names are all under ``slipstream``, in one dependency order that
``lint-imports`` holds (see ``[tool.importlinter]`` in pyproject.toml):

- ``slipstream.protos``: the generated gRPC code;
- ``slipstream.core``: what every part shares (errors, addresses, digests, sizes);
- ``slipstream.splitter``: the pure test splitter;
- ``slipstream.client`` and ``slipstream.cache_server``, which never import each other;
- ``slipstream.cli`` and ``slipstream.pytest_plugin``, the entry points.
"""
