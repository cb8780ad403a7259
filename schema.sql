-- certgate store, schema version 2 (PRAGMA user_version).
--
-- Applied by `Store::create` (src/store.rs) to a new, empty file, inside the one transaction
-- that also stores the server certificate. Two settings are per connection rather than per
-- file, so the store sets them on every open, before any transaction (SQLite cannot switch to
-- WAL inside one):
--
--   PRAGMA journal_mode = WAL;   -- readers (the gateway) never block the writing command
--   PRAGMA foreign_keys = ON;    -- removing an API removes its resources and certificates
--
-- Times are unix seconds. Scopes are space-separated, as in an OAuth2 `scope` claim.

-- Key/value settings: `server_cert_pem` (the gateway's certificate chain) and
-- `server_key_pem` (its private key; the reason the file is created with mode 0600).
CREATE TABLE settings (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

-- A tier of N requests per period is a token bucket of capacity `burst` refilled at N per
-- period. All three are NULL for a tier without a rate (Unlimited).
CREATE TABLE tiers (
    id       INTEGER PRIMARY KEY,
    name     TEXT NOT NULL UNIQUE COLLATE NOCASE,
    requests INTEGER CHECK (requests > 0),
    per      TEXT CHECK (per IN ('second', 'minute', 'hour', 'day')),
    burst    INTEGER CHECK (burst > 0),
    CHECK ((requests IS NULL) = (per IS NULL) AND (requests IS NULL) = (burst IS NULL))
) STRICT;

INSERT INTO tiers (name, requests, per, burst) VALUES
    ('Unlimited', NULL, NULL, NULL),
    ('Gold', 5000, 'minute', 5000),
    ('Silver', 2000, 'minute', 2000),
    ('Bronze', 1000, 'minute', 1000);

-- An API is served under `base_path`: its context, then `/version` when it has one.
-- `backend_addrs` holds the backend host's addresses as resolved by the last `api add` or
-- `api update` (space-separated socket addresses), so that loading a snapshot needs no DNS.
CREATE TABLE apis (
    id            INTEGER PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    context       TEXT NOT NULL,
    version       TEXT,
    base_path     TEXT NOT NULL UNIQUE,
    backend_url   TEXT NOT NULL,
    backend_addrs TEXT NOT NULL,
    mtls          TEXT NOT NULL CHECK (mtls IN ('mandatory', 'optional', 'off')),
    oauth2        TEXT NOT NULL CHECK (oauth2 IN ('mandatory', 'optional', 'off')),
    tier_id       INTEGER REFERENCES tiers (id),
    created       INTEGER NOT NULL,
    CHECK (mtls = 'mandatory' OR oauth2 = 'mandatory')
) STRICT;

-- A resource restricts an API to the listed method + path templates.
CREATE TABLE resources (
    id      INTEGER PRIMARY KEY,
    api_id  INTEGER NOT NULL REFERENCES apis (id) ON DELETE CASCADE,
    method  TEXT NOT NULL,
    path    TEXT NOT NULL,
    tier_id INTEGER REFERENCES tiers (id),
    scopes  TEXT NOT NULL DEFAULT '',
    no_auth INTEGER NOT NULL DEFAULT 0 CHECK (no_auth IN (0, 1)),
    created INTEGER NOT NULL,
    UNIQUE (api_id, method, path)
) STRICT;

-- A client certificate registered for one API. The fields are parsed once, at `cert add`, so
-- that building a snapshot needs no X.509 parsing. `chain_pem` holds the CERTIFICATE blocks
-- that followed the certificate in the file it was added from (empty for none).
CREATE TABLE certs (
    id         INTEGER PRIMARY KEY,
    alias      TEXT NOT NULL UNIQUE,
    api_id     INTEGER NOT NULL REFERENCES apis (id) ON DELETE CASCADE,
    tier_id    INTEGER NOT NULL REFERENCES tiers (id),
    kind       TEXT NOT NULL CHECK (kind IN ('pinned', 'ca')),
    der        BLOB NOT NULL,
    chain_pem  TEXT NOT NULL DEFAULT '',
    sha256     TEXT NOT NULL CHECK (length(sha256) = 64),
    subject    TEXT NOT NULL,
    issuer     TEXT NOT NULL,
    serial     TEXT NOT NULL,
    not_before INTEGER NOT NULL,
    not_after  INTEGER NOT NULL,
    scopes     TEXT NOT NULL DEFAULT '',
    created    INTEGER NOT NULL,
    UNIQUE (api_id, sha256)
) STRICT;

CREATE INDEX resources_tier ON resources (tier_id);
CREATE INDEX certs_tier ON certs (tier_id);
CREATE INDEX apis_tier ON apis (tier_id);

PRAGMA user_version = 1;

-- @@ version 2 @@ (a database of version 1 gets what follows this line)

-- A certificate revocation list, one per issuer: the newest one added. `issuer` is the
-- issuer's name in the form `certs.issuer` has, so that pinned entries find theirs; `der` is
-- what CA-issued chains are checked against. Delta and indirect CRLs are never stored.
CREATE TABLE crls (
    id          INTEGER PRIMARY KEY,
    issuer      TEXT NOT NULL UNIQUE,
    -- The CRL number extension, as a decimal string (NULL when the CRL has none).
    number      TEXT,
    this_update INTEGER NOT NULL,
    next_update INTEGER,
    der         BLOB NOT NULL,
    created     INTEGER NOT NULL
) STRICT;

-- The serial numbers a CRL revokes, lower-case hex as in `certs.serial`.
CREATE TABLE crl_entries (
    crl_id  INTEGER NOT NULL REFERENCES crls (id) ON DELETE CASCADE,
    serial  TEXT NOT NULL,
    revoked INTEGER NOT NULL,
    PRIMARY KEY (crl_id, serial)
) STRICT;

-- Throttling buckets that are not full, saved by the gateway every few seconds and when it
-- stops, and read back when it starts, so that a restart hands out no fresh quota. A bucket is
-- the time it is full again (nanoseconds since the Unix epoch) and the limit that time was
-- reckoned with; its key is hashed from the names of its API, resource and certificate entry
-- (src/throttle.rs) and the caller's certificate fingerprint (its first 8 bytes; 0 for none).
-- 64-bit keys are stored as the signed integers of the same bits.
CREATE TABLE buckets (
    kind     TEXT NOT NULL CHECK (kind IN ('caller', 'resource', 'api')),
    scope    INTEGER NOT NULL,
    entry    INTEGER NOT NULL,
    caller   INTEGER NOT NULL,
    full_at  INTEGER NOT NULL,
    interval INTEGER NOT NULL,
    burst    INTEGER NOT NULL,
    PRIMARY KEY (kind, scope, entry, caller)
) STRICT, WITHOUT ROWID;

CREATE INDEX buckets_full_at ON buckets (full_at);

-- What throttling saw, per API and caller (certificate entry alias and leaf fingerprint, or
-- '-' and '' for a public resource): requests allowed and throttled in all, and in the
-- gateway's current run (zeroed when `serve` starts). The gateway adds to it every few
-- seconds; `certgate status` reads it.
CREATE TABLE counters (
    api             TEXT NOT NULL,
    alias           TEXT NOT NULL,
    caller          TEXT NOT NULL,
    subject         TEXT NOT NULL,
    allowed_total   INTEGER NOT NULL DEFAULT 0,
    throttled_total INTEGER NOT NULL DEFAULT 0,
    allowed_run     INTEGER NOT NULL DEFAULT 0,
    throttled_run   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (api, alias, caller)
) STRICT, WITHOUT ROWID;

PRAGMA user_version = 2;
