-- Migration 1: pools and vms. Applied by admin::store inside one transaction;
-- PRAGMA user_version records the last migration applied.

CREATE TABLE pools (
    id          TEXT PRIMARY KEY NOT NULL
                CHECK (length(id) = 1 AND id BETWEEN 'A' AND 'Z'),
    name        TEXT NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 64),
    gpu_index   INTEGER NOT NULL DEFAULT 0 CHECK (gpu_index BETWEEN 0 AND 4294967295),
    description TEXT NOT NULL DEFAULT ''
) STRICT;

CREATE TABLE vms (
    uuid              TEXT PRIMARY KEY NOT NULL
                      CHECK (length(uuid) = 36
                             AND substr(uuid, 9, 1) = '-' AND substr(uuid, 14, 1) = '-'
                             AND substr(uuid, 19, 1) = '-' AND substr(uuid, 24, 1) = '-'
                             AND length(replace(uuid, '-', '')) = 32
                             AND replace(uuid, '-', '') NOT GLOB '*[^0-9a-f]*'),
    vm_id             INTEGER NOT NULL UNIQUE CHECK (vm_id BETWEEN 1 AND 4294967295),
    name              TEXT UNIQUE
                      CHECK (name IS NULL OR (length(name) BETWEEN 1 AND 64
                                              AND name NOT GLOB '*[^A-Za-z0-9._-]*'
                                              AND name GLOB '*[^0-9]*')),
    pool_id           TEXT NOT NULL DEFAULT 'A' REFERENCES pools(id),
    priority          INTEGER NOT NULL DEFAULT 1 CHECK (priority BETWEEN 0 AND 2),
    max_queued        INTEGER NOT NULL DEFAULT 64 CHECK (max_queued BETWEEN 1 AND 4294967295),
    gpu_mem_quota_mib INTEGER NOT NULL DEFAULT 4096 CHECK (gpu_mem_quota_mib >= 0),
    created_at        TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
    updated_at        TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
) STRICT;

CREATE INDEX vms_pool ON vms (pool_id);

INSERT INTO pools (id, name, gpu_index, description) VALUES
    ('A', 'Pool A', 0, 'default pool'),
    ('B', 'Pool B', 0, 'second pool; move it to another GPU with pool-set-gpu');
