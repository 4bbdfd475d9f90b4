-- Node-local bookkeeping of the blob collector (src/hosting/gc.rs).

-- Blobs this node found unreferenced, and since when: one is deleted only after it stayed
-- unreferenced for the grace period.
CREATE TABLE blob_unreferenced (
    hash  TEXT PRIMARY KEY NOT NULL,
    since INTEGER NOT NULL
);

-- Bytes of blobs that a merged delete removed while this node still referenced them, kept
-- (in the merge's own transaction) until a local write re-inserts them.
CREATE TABLE blob_rescue (
    hash TEXT PRIMARY KEY NOT NULL,
    size INTEGER NOT NULL,
    data BLOB NOT NULL,
    gzip BLOB,
    br   BLOB
);

-- Versions (and their file lists) that a merged delete removed while this node's app still
-- serves them (a prune on one node racing a rollback on another), kept like blob_rescue.
CREATE TABLE version_rescue (
    id          TEXT PRIMARY KEY NOT NULL,
    app_id      TEXT NOT NULL,
    number      INTEGER NOT NULL,
    spa         INTEGER NOT NULL,
    file_count  INTEGER NOT NULL,
    total_bytes INTEGER NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE TABLE version_files_rescue (
    version_id TEXT NOT NULL,
    path       TEXT NOT NULL,
    hash       TEXT NOT NULL,
    size       INTEGER NOT NULL,
    mime       TEXT NOT NULL,
    PRIMARY KEY (version_id, path)
);
