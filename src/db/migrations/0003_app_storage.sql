-- App storage for serverless code (fazt.app.kv / ds / s3, fazt.env). Replicated: what an app
-- writes on one node appears on its peers. `user_id` is '' for app-wide data and the user's
-- id for fazt.app.user.*. Values that must change together live in one column, because the
-- replication engine merges column by column (last writer wins per column).

-- Key-value entries. `data` is JSON {"value": ..., "expiresAt": ms} (expiresAt only with a
-- TTL), so a value and its expiry always come from the same write.
CREATE TABLE app_kv (
    app_id  TEXT NOT NULL,
    user_id TEXT NOT NULL DEFAULT '',
    key     TEXT NOT NULL,
    data    TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (app_id, user_id, key)
);

-- Documents: one row per document, merged per document (the JSON `data` is one column).
-- Fields changed with $inc are counters: their increments live in app_doc_counters, one row
-- per node, so increments made concurrently on several nodes add up.
CREATE TABLE app_docs (
    app_id     TEXT NOT NULL,
    user_id    TEXT NOT NULL DEFAULT '',
    collection TEXT NOT NULL,
    id         TEXT NOT NULL,
    data       TEXT NOT NULL DEFAULT '{}',
    created_at INTEGER NOT NULL DEFAULT 0,
    updated_at INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (app_id, user_id, collection, id)
);

-- A node's increments of one counter field since the field was last set (`base` names that
-- set: the stamp kept for the field in the document).
CREATE TABLE app_doc_counters (
    app_id     TEXT NOT NULL,
    user_id    TEXT NOT NULL DEFAULT '',
    collection TEXT NOT NULL,
    doc_id     TEXT NOT NULL,
    field      TEXT NOT NULL,
    node       TEXT NOT NULL,
    base       TEXT NOT NULL DEFAULT '',
    amount     REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (app_id, user_id, collection, doc_id, field, node)
);

-- Blobs by path. The bytes are content-addressed in `blobs`; `meta` is JSON
-- {"hash", "mime", "size", "updatedAt"} (one column: one write's fields stay together).
CREATE TABLE app_files (
    app_id  TEXT NOT NULL,
    user_id TEXT NOT NULL DEFAULT '',
    path    TEXT NOT NULL,
    meta    TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (app_id, user_id, path)
);

-- Per-app variables (`fazt app env set`), read by fazt.env and the fetch handler's env.
CREATE TABLE app_env (
    app_id TEXT NOT NULL,
    key    TEXT NOT NULL,
    value  TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (app_id, key)
);

-- Node-local: console output and errors of the app code this node ran.
CREATE TABLE app_logs (
    id      INTEGER PRIMARY KEY,
    app_id  TEXT NOT NULL,
    at      INTEGER NOT NULL,
    level   TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX app_logs_by_app ON app_logs (app_id, id);
