"""Adapter folder formats: reading what other tools write, writing what they load."""
