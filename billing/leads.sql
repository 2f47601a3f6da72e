-- leadflow lead archive: one row per lead sold to one buyer (SQLite and PostgreSQL).
-- (tenant, lead_id, buyer) is the idempotency key of the lead archive worker: a sale
-- replayed inserts nothing twice, an outcome or a return is an UPDATE that only moves a
-- row forward (pending to decided, not returned to returned).
-- Money columns are integer micros ($1.00 = 1000000), times are epoch milliseconds.
-- fields: the lead's normalized fields that are not personal (JSON object of strings),
-- personal: the personal ones (name, e-mail, phone, address, the campaign's fields typed
-- email/phone/dob/ip), set to NULL by the retention sweep (pii_erased_ts: when).
-- sold = 0: a placeholder made by a return seen before its sale (filled in by the sale).
CREATE TABLE IF NOT EXISTS sold_leads (
    tenant        TEXT   NOT NULL,
    lead_id       TEXT   NOT NULL,
    buyer         TEXT   NOT NULL,
    ts            BIGINT NOT NULL DEFAULT 0,
    campaign      TEXT   NOT NULL DEFAULT '',
    supplier      TEXT   NOT NULL DEFAULT '',
    account       TEXT   NOT NULL DEFAULT '',
    price         BIGINT NOT NULL DEFAULT 0,
    fee           BIGINT NOT NULL DEFAULT 0,
    outcome       TEXT   NOT NULL DEFAULT 'pending',
    reason        TEXT   NOT NULL DEFAULT '',
    returned_ts   BIGINT,
    return_reason TEXT   NOT NULL DEFAULT '',
    fields        TEXT   NOT NULL DEFAULT '{}',
    personal      TEXT,
    pii_erased_ts BIGINT,
    sold          INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (tenant, lead_id, buyer)
);
CREATE INDEX IF NOT EXISTS sold_leads_account ON sold_leads (tenant, account, ts);
CREATE INDEX IF NOT EXISTS sold_leads_outcome ON sold_leads (tenant, outcome, ts);
CREATE INDEX IF NOT EXISTS sold_leads_pii ON sold_leads (tenant, pii_erased_ts, ts);
-- The delivery log of a sale, one row per attempt or decision (engine.delivery's log
-- entry: result accepted, rejected, duplicated, retry, deferred, failed, skipped, ...),
-- copied once its delivery settled (its decision recorded, its money effect applied, the
-- job acked), when Redis forgets the log. Inserted once each (ON CONFLICT DO NOTHING).
CREATE TABLE IF NOT EXISTS sold_lead_attempts (
    tenant  TEXT    NOT NULL,
    lead_id TEXT    NOT NULL,
    buyer   TEXT    NOT NULL,
    ts      BIGINT  NOT NULL,
    attempt INTEGER NOT NULL,
    result  TEXT    NOT NULL,
    status  INTEGER NOT NULL DEFAULT 0,
    ms      BIGINT  NOT NULL DEFAULT 0,
    reason  TEXT    NOT NULL DEFAULT '',
    excerpt TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY (tenant, lead_id, buyer, ts, attempt, result)
);
