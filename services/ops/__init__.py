"""Operator tools: dead letters (``fluxpipe dlq``), stuck tasks (``fluxpipe stuck``), replay."""
