-- Expired key-value entries are removed as apps write (storage::kv::set), found by this index.
CREATE INDEX app_kv_by_expiry ON app_kv (json_extract(data, '$.expiresAt'))
    WHERE json_extract(data, '$.expiresAt') IS NOT NULL;
