"""Alembic migrations: the only way the schema is made (``forgetguard db upgrade``).

Shipped inside the package so an installed wheel finds them; ``migrations/`` at the top of the
repository is a link here.
"""
