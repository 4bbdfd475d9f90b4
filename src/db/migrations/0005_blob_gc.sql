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
