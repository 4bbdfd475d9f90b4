-- Documents are read in creation order (fazt.app.ds find/count stream them and stop at the
-- limit): this index gives that order without sorting the collection.
CREATE INDEX app_docs_by_created ON app_docs (app_id, user_id, collection, created_at, id);

-- Replicated: per-app storage limits (`fazt app quota`), the same on every peer. No row, or
-- 0, means the default (storage::quota::DEFAULT_STORAGE_BYTES).
CREATE TABLE app_quotas (
    app_id        TEXT PRIMARY KEY NOT NULL,
    storage_bytes INTEGER NOT NULL DEFAULT 0
);

-- Node-local: the bytes each app stores in kv, ds and s3 together, as counted by
-- storage::quota (keys, values and s3 object sizes, plus 64 bytes a row). Kept by the
-- triggers below, so rows merged from peers count too.
CREATE TABLE app_usage (
    app_id TEXT PRIMARY KEY NOT NULL,
    bytes  INTEGER NOT NULL DEFAULT 0
);

CREATE TRIGGER app_usage_kv_ins AFTER INSERT ON app_kv BEGIN
    INSERT INTO app_usage (app_id, bytes)
    VALUES (NEW.app_id, 64 + octet_length(NEW.user_id) + octet_length(NEW.key) + octet_length(NEW.data))
    ON CONFLICT (app_id) DO UPDATE SET bytes = bytes + excluded.bytes;
END;
CREATE TRIGGER app_usage_kv_del AFTER DELETE ON app_kv BEGIN
    UPDATE app_usage SET bytes = bytes - (64 + octet_length(OLD.user_id) + octet_length(OLD.key) + octet_length(OLD.data))
    WHERE app_id = OLD.app_id;
END;
CREATE TRIGGER app_usage_kv_upd AFTER UPDATE ON app_kv BEGIN
    UPDATE app_usage SET bytes = bytes - (64 + octet_length(OLD.user_id) + octet_length(OLD.key) + octet_length(OLD.data))
    WHERE app_id = OLD.app_id;
    INSERT INTO app_usage (app_id, bytes)
    VALUES (NEW.app_id, 64 + octet_length(NEW.user_id) + octet_length(NEW.key) + octet_length(NEW.data))
    ON CONFLICT (app_id) DO UPDATE SET bytes = bytes + excluded.bytes;
END;

CREATE TRIGGER app_usage_docs_ins AFTER INSERT ON app_docs BEGIN
    INSERT INTO app_usage (app_id, bytes)
    VALUES (NEW.app_id, 64 + octet_length(NEW.user_id) + octet_length(NEW.collection) + octet_length(NEW.id) + octet_length(NEW.data))
    ON CONFLICT (app_id) DO UPDATE SET bytes = bytes + excluded.bytes;
END;
CREATE TRIGGER app_usage_docs_del AFTER DELETE ON app_docs BEGIN
    UPDATE app_usage SET bytes = bytes - (64 + octet_length(OLD.user_id) + octet_length(OLD.collection) + octet_length(OLD.id) + octet_length(OLD.data))
    WHERE app_id = OLD.app_id;
END;
CREATE TRIGGER app_usage_docs_upd AFTER UPDATE ON app_docs BEGIN
    UPDATE app_usage SET bytes = bytes - (64 + octet_length(OLD.user_id) + octet_length(OLD.collection) + octet_length(OLD.id) + octet_length(OLD.data))
    WHERE app_id = OLD.app_id;
    INSERT INTO app_usage (app_id, bytes)
    VALUES (NEW.app_id, 64 + octet_length(NEW.user_id) + octet_length(NEW.collection) + octet_length(NEW.id) + octet_length(NEW.data))
    ON CONFLICT (app_id) DO UPDATE SET bytes = bytes + excluded.bytes;
END;

-- An s3 object counts its size (from its metadata; invalid metadata counts 0), whether or not
-- its bytes are shared with other paths.
CREATE TRIGGER app_usage_files_ins AFTER INSERT ON app_files BEGIN
    INSERT INTO app_usage (app_id, bytes)
    VALUES (NEW.app_id, 64 + octet_length(NEW.user_id) + octet_length(NEW.path)
        + CASE WHEN json_valid(NEW.meta) THEN max(0, ifnull(CAST(json_extract(NEW.meta, '$.size') AS INTEGER), 0)) ELSE 0 END)
    ON CONFLICT (app_id) DO UPDATE SET bytes = bytes + excluded.bytes;
END;
CREATE TRIGGER app_usage_files_del AFTER DELETE ON app_files BEGIN
    UPDATE app_usage SET bytes = bytes - (64 + octet_length(OLD.user_id) + octet_length(OLD.path)
        + CASE WHEN json_valid(OLD.meta) THEN max(0, ifnull(CAST(json_extract(OLD.meta, '$.size') AS INTEGER), 0)) ELSE 0 END)
    WHERE app_id = OLD.app_id;
END;
CREATE TRIGGER app_usage_files_upd AFTER UPDATE ON app_files BEGIN
    UPDATE app_usage SET bytes = bytes - (64 + octet_length(OLD.user_id) + octet_length(OLD.path)
        + CASE WHEN json_valid(OLD.meta) THEN max(0, ifnull(CAST(json_extract(OLD.meta, '$.size') AS INTEGER), 0)) ELSE 0 END)
    WHERE app_id = OLD.app_id;
    INSERT INTO app_usage (app_id, bytes)
    VALUES (NEW.app_id, 64 + octet_length(NEW.user_id) + octet_length(NEW.path)
        + CASE WHEN json_valid(NEW.meta) THEN max(0, ifnull(CAST(json_extract(NEW.meta, '$.size') AS INTEGER), 0)) ELSE 0 END)
    ON CONFLICT (app_id) DO UPDATE SET bytes = bytes + excluded.bytes;
END;

-- What apps stored before this migration.
INSERT INTO app_usage (app_id, bytes)
SELECT app_id, sum(n) FROM (
    SELECT app_id, 64 + octet_length(user_id) + octet_length(key) + octet_length(data) AS n FROM app_kv
    UNION ALL
    SELECT app_id, 64 + octet_length(user_id) + octet_length(collection) + octet_length(id) + octet_length(data) FROM app_docs
    UNION ALL
    SELECT app_id, 64 + octet_length(user_id) + octet_length(path)
        + CASE WHEN json_valid(meta) THEN max(0, ifnull(CAST(json_extract(meta, '$.size') AS INTEGER), 0)) ELSE 0 END FROM app_files
) GROUP BY app_id;
