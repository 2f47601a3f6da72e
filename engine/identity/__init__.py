"""Identities: portal users (e-mail and argon2 password, invites), their mappings to client
accounts, buyer API keys, and the audit trail, in SQL (engine.store.sql: SQLite by default,
PostgreSQL with ``sql_url``). Imports only engine.core and engine.store (docs/portal.md)."""
