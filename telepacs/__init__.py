"""telepacs: the composition root (the ``telepacs`` command). No domain logic here."""
