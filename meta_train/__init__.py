"""Loops that meta-train metanetworks over task suites."""
