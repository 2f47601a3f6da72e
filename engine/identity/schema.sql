-- leadflow identities (SQLite and PostgreSQL): portal users, their client accounts, invites,
-- buyer API keys and the audit trail. Times are epoch milliseconds. Created at open, beside
-- the ledger archive's table (the same database). docs/portal.md describes the model.
-- No semicolon in a comment: the PostgreSQL backend runs the file statement by statement.
CREATE TABLE IF NOT EXISTS portal_users (
    id              TEXT   NOT NULL PRIMARY KEY,
    tenant          TEXT   NOT NULL,
    email           TEXT   NOT NULL,
    password_hash   TEXT,
    status          TEXT   NOT NULL,
    created_ms      BIGINT NOT NULL,
    updated_ms      BIGINT NOT NULL,
    failed_logins   BIGINT NOT NULL DEFAULT 0,
    locked_until_ms BIGINT NOT NULL DEFAULT 0
);
-- the e-mail is stored lower-cased: one login per address and tenant
CREATE UNIQUE INDEX IF NOT EXISTS portal_users_email ON portal_users (tenant, email);

CREATE TABLE IF NOT EXISTS portal_user_accounts (
    tenant  TEXT NOT NULL,
    user_id TEXT NOT NULL,
    account TEXT NOT NULL,
    PRIMARY KEY (user_id, account)
);
CREATE INDEX IF NOT EXISTS portal_user_accounts_account
    ON portal_user_accounts (tenant, account);

-- the tenant's operators: portal users who see the operator page (the tenant's clients,
-- balances, users and mappings), with no client account and no buyer key. A table of its
-- own, so that databases made before roles need no migration (absent: a buyer)
CREATE TABLE IF NOT EXISTS portal_operators (
    tenant  TEXT NOT NULL,
    user_id TEXT NOT NULL PRIMARY KEY
);

-- an invite token is stored as its SHA-256 only (hex), used_ms makes it one time
CREATE TABLE IF NOT EXISTS portal_invites (
    token_hash TEXT   NOT NULL PRIMARY KEY,
    tenant     TEXT   NOT NULL,
    user_id    TEXT   NOT NULL,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    used_ms    BIGINT
);
CREATE INDEX IF NOT EXISTS portal_invites_user ON portal_invites (user_id);

-- a buyer API key lfk_<id>_<secret>: only its SHA-256 (hex) is kept
CREATE TABLE IF NOT EXISTS api_keys (
    id           TEXT   NOT NULL PRIMARY KEY,
    tenant       TEXT   NOT NULL,
    user_id      TEXT   NOT NULL,
    created_by   TEXT   NOT NULL DEFAULT '',
    prefix       TEXT   NOT NULL,
    key_hash     TEXT   NOT NULL,
    name         TEXT   NOT NULL DEFAULT '',
    created_ms   BIGINT NOT NULL,
    last_used_ms BIGINT,
    revoked_ms   BIGINT
);
CREATE UNIQUE INDEX IF NOT EXISTS api_keys_hash ON api_keys (key_hash);
CREATE INDEX IF NOT EXISTS api_keys_user ON api_keys (tenant, user_id);

-- who did what: actor is "tenant" or a portal user's id, key_id the buyer key used (or '')
CREATE TABLE IF NOT EXISTS portal_audit (
    id      TEXT   NOT NULL PRIMARY KEY,
    tenant  TEXT   NOT NULL,
    actor   TEXT   NOT NULL,
    key_id  TEXT   NOT NULL DEFAULT '',
    action  TEXT   NOT NULL,
    account TEXT   NOT NULL DEFAULT '',
    detail  TEXT   NOT NULL DEFAULT '{}',
    ts_ms   BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS portal_audit_tenant ON portal_audit (tenant, ts_ms);

-- a portal login: the session token (the cookie's value) is kept as its SHA-256 only (hex).
-- expires_ms is the absolute end, last_seen_ms the idle clock (docs/portal.md "Sessions")
CREATE TABLE IF NOT EXISTS portal_sessions (
    token_hash   TEXT   NOT NULL PRIMARY KEY,
    tenant       TEXT   NOT NULL,
    user_id      TEXT   NOT NULL,
    created_ms   BIGINT NOT NULL,
    last_seen_ms BIGINT NOT NULL,
    expires_ms   BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS portal_sessions_user ON portal_sessions (tenant, user_id);
