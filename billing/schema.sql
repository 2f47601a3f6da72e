-- leadflow ledger archive: one row per ledger stream entry (SQLite and PostgreSQL).
-- entry_id is the Redis stream id "<ms>-<seq>" of the tenant's ledger stream;
-- (tenant, entry_id) is the idempotency key of the archive worker (ON CONFLICT DO NOTHING).
-- Money columns are integer micros ($1.00 = 1000000).
CREATE TABLE IF NOT EXISTS ledger_entries (
    tenant   TEXT   NOT NULL,
    entry_id TEXT   NOT NULL,
    id_ms    BIGINT NOT NULL,
    id_seq   BIGINT NOT NULL,
    account  TEXT   NOT NULL,
    kind     TEXT   NOT NULL,
    delta    BIGINT NOT NULL,
    balance  BIGINT NOT NULL,
    ref      TEXT   NOT NULL DEFAULT '',
    ts       BIGINT NOT NULL,
    process  TEXT   NOT NULL DEFAULT '',
    usr      TEXT   NOT NULL DEFAULT '',
    extra    TEXT   NOT NULL DEFAULT '{}',
    PRIMARY KEY (tenant, entry_id)
);
CREATE INDEX IF NOT EXISTS ledger_entries_account
    ON ledger_entries (tenant, account, id_ms, id_seq);
CREATE INDEX IF NOT EXISTS ledger_entries_ts
    ON ledger_entries (tenant, account, ts);
