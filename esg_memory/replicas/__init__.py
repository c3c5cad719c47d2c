"""Serving replicas that share one edit memory through PostgreSQL.

=============  ==================================================================================
`store`        the database: schema (versioned), the ordered change log, snapshot rows
`log`          `SharedLog`: compare-and-append of a replica's writes, pulling other replicas' records
`follower`     the thread that LISTENs for new records and applies them (staleness, reconnection)
`pack`         a snapshot directory packed into one blob for a snapshot row
`opening`      `open_store` (`EditMemory.open("postgresql://...")`) and `migrate` (directory <-> store)
=============  ==================================================================================

The log's records are the journal's (`esg_memory.persist.journal`): typed operations plus the states
they install, each appended in its own transaction. Needs the ``postgres`` extra (psycopg 3).
"""

from .log import SharedLog
from .opening import migrate, open_store
from .store import SCHEMA_VERSION, Store, is_store_url

__all__ = ["SCHEMA_VERSION", "SharedLog", "Store", "is_store_url", "migrate", "open_store"]
