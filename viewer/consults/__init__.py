"""Teleconsultation: ``service`` (the lifecycle and record, no Flask), ``views`` (its blueprint), ``pdf``, ``deid``."""
