-- Node-local tables: never replicated. They describe this node (identity, how it listens)
-- rather than the cluster's content.
CREATE TABLE node_config (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);

CREATE TABLE node_identity (
    id         INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    secret_key BLOB NOT NULL,
    created_at INTEGER NOT NULL
);

-- The server that is running on this file right now, if any (for `server status` and for
-- the URLs that `app deploy` prints). A stale row after kill -9 is detected by its pid.
CREATE TABLE node_runtime (
    id         INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    pid        INTEGER NOT NULL,
    port       INTEGER NOT NULL,
    domain     TEXT NOT NULL,
    started_at INTEGER NOT NULL
);

-- Replicated tables. Every one follows the replication rules checked by
-- fazt_sync::check_replicable: NOT NULL primary key, no other UNIQUE index, no
-- AUTOINCREMENT, no FOREIGN KEY, defaults on NOT NULL columns.

-- Cluster-wide settings (deploy limits, ...).
CREATE TABLE settings (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL DEFAULT ''
);

-- An app's id is derived from its name when first deployed, so that two nodes deploying the
-- same name while apart converge on one app.
CREATE TABLE apps (
    id              TEXT PRIMARY KEY NOT NULL,
    name            TEXT NOT NULL DEFAULT '',
    current_version TEXT NOT NULL DEFAULT '',
    created_at      INTEGER NOT NULL DEFAULT 0,
    updated_at      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX apps_by_name ON apps (name);

-- Subdomain -> app. Serving resolves host -> alias -> app id -> current version.
CREATE TABLE aliases (
    subdomain  TEXT PRIMARY KEY NOT NULL,
    app_id     TEXT NOT NULL DEFAULT '',
    updated_at INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX aliases_by_app ON aliases (app_id);

-- Immutable deploys. `number` is for people (v1, v2, ...); `id` is what identifies it.
CREATE TABLE versions (
    id          TEXT PRIMARY KEY NOT NULL,
    app_id      TEXT NOT NULL DEFAULT '',
    number      INTEGER NOT NULL DEFAULT 0,
    spa         INTEGER NOT NULL DEFAULT 0,
    file_count  INTEGER NOT NULL DEFAULT 0,
    total_bytes INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX versions_by_app ON versions (app_id, created_at);

-- The files of a version, pointing at content by hash.
CREATE TABLE version_files (
    version_id TEXT NOT NULL,
    path       TEXT NOT NULL,
    hash       TEXT NOT NULL DEFAULT '',
    size       INTEGER NOT NULL DEFAULT 0,
    mime       TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (version_id, path)
);

-- Content-addressed bytes (SHA-256, hex), with the compressed variants made at deploy time
-- (NULL when the type does not compress or compression did not pay).
CREATE TABLE blobs (
    hash TEXT PRIMARY KEY NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    data BLOB NOT NULL DEFAULT x'',
    gzip BLOB,
    br   BLOB
);
