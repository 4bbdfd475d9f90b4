-- Peers and trust: node-local, never replicated. A peer is another node whose key this node
-- pins; connections from any other key are refused during the TLS handshake.
CREATE TABLE peers (
    name       TEXT PRIMARY KEY NOT NULL,
    node_id    TEXT NOT NULL UNIQUE,
    -- HOST:PORT this node dials; NULL when only the peer dials us.
    addr       TEXT,
    added_at   INTEGER NOT NULL,
    -- Kept up to date by the running server.
    connected  INTEGER NOT NULL DEFAULT 0,
    last_seen  INTEGER,
    -- Origin versions this node holds that the peer did not, when last heard from.
    lag        INTEGER
);

-- One-time invitations (`fazt peer invite`). Only the secret's hash is kept.
CREATE TABLE peer_invites (
    secret_hash TEXT PRIMARY KEY NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER,
    used_by     TEXT
);

-- Content fetched from a peer for a transaction not applied yet: a transfer cut off midway
-- resumes without fetching it again. Rows go once the transaction is applied.
CREATE TABLE peer_content (
    digest      BLOB PRIMARY KEY NOT NULL,
    data        BLOB NOT NULL,
    received_at INTEGER NOT NULL
);

ALTER TABLE node_runtime ADD COLUMN sync_port INTEGER NOT NULL DEFAULT 0;
