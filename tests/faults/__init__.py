"""Fault-injection tests against real servers (issue 3, item 6): each fault of the failure
model in DESIGN.md, with exact accounting and bounded caller latency."""
