"""Hypothesis settings for the policy tests: no deadline (the machine is shared and small; a slow
example is not a wrong one, and these tests assert decisions, never timings)."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile("policy", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("policy")
